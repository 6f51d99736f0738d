//! The control plane (issue 14) with real processes: `sluice control`,
//! cells (`sluice serve`) that take their workspaces from it, routers and a
//! sink. Each test runs in phases (the processes start once), one test at a
//! time:
//! - the control plane's own behaviour on two embedded cells and an SQLite
//!   store: workspaces made through the API reach their cell live (the
//!   first request of a new workspace included), events land in their
//!   workspace's cell and are delivered once, usage is metered exactly,
//!   capacity thresholds provision a third cell with the bundled local
//!   provisioner, and bad input gets clear answers;
//! - moving a workspace between two embedded cells under live traffic
//!   (issue 15): resends across the cutover, the race between the source's
//!   ack and its dedup made certain with a pause point, every acknowledged
//!   event delivered once;
//! - the topology: three cells (two embedded, one on Kafka +
//!   PostgreSQL), two routers and the control plane on PostgreSQL, fifty
//!   workspaces sending through the official Python and Node SDKs.

mod util;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use util::*;

const TOKEN: &str = "control-token-0123456789";

/// One test at a time: each runs a fleet of processes.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

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

/// `[cell]` and the settings every test cell shares.
/// A control plane on `store` whose SMB cells hold `workspaces` workspaces
/// (the other thresholds out of reach), provisioning with the local
/// provisioner into `provisioned`.
fn start_control(dir: &Path, store: &str, provisioned: &Path, workspaces: u32) -> (Server, Api) {
    start_control_with(dir, store, provisioned, workspaces, "")
}

/// [`start_control`] with more `[control]` keys.
fn start_control_with(dir: &Path, store: &str, provisioned: &Path, workspaces: u32, extra: &str) -> (Server, Api) {
    let config = dir.join("control.toml");
    // A fixed port (free now): cells find it again after a restart.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    std::fs::write(
        &config,
        format!(
            "[control]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"{TOKEN}\"\nscrape_interval = \"1s\"\nallow_private_network_destinations = true\n{extra}\
             provision_command = [{bin:?}, \"provision-local\", \"--dir\", {dir:?}]\nprovision_timeout = \"90s\"\n\
             [control.thresholds.smb]\nworkspaces = {workspaces}\ncpu = 1.0\nconsumer_lag = \"1h\"\ndb_connections = 1.0\ningest_p99 = \"1h\"\n",
            bin = env!("CARGO_BIN_EXE_sluice"),
            dir = provisioned.display().to_string(),
        ),
    )
    .unwrap();
    let control = Server::start_role("control", &config, &[("SLUICE_GLOBAL_STORE", store)]);
    let api = Api { base: format!("http://{}", control.addr), http: reqwest::blocking::Client::new() };
    (control, api)
}

/// The folder the local provisioner starts cells in; on drop (a test's end
/// or its panic) those cells are stopped: they run in process groups of their own.
struct Provisioned(std::path::PathBuf);

impl Drop for Provisioned {
    fn drop(&mut self) {
        for entry in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
            if let Ok(pid) = std::fs::read_to_string(entry.path().join("sluice.pid")) {
                let _ = std::process::Command::new("kill").args(["-TERM", pid.trim()]).status();
            }
        }
    }
}

fn cell_toml(id: &str, control: &str, token: &str) -> String {
    format!("[cell]\nid = \"{id}\"\ncontrol_url = \"{control}\"\ntoken = \"{token}\"\npoll_interval = \"300ms\"\nreport_interval = \"500ms\"\n")
}

/// The test cells' `admin.token`.
const CELL_ADMIN_TOKEN: &str = "cell-admin-token";

/// An embedded cell's config.
fn cell_config(dir: &Path, id: &str, control: &str, token: &str) -> std::path::PathBuf {
    let path = dir.join("sluice.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\ntrusted_proxies = [\"127.0.0.1\"]\n\
             [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{CELL_ADMIN_TOKEN}\"\n[log]\npartitions = 2\n\
             [deliver]\ninitial_backoff = \"100ms\"\n{}",
            dir.join("data").display(),
            cell_toml(id, control, token)
        ),
    )
    .unwrap();
    path
}

/// Register cell `id` (a placeholder URL until it runs), start it with its token, then give the store its real URLs.
fn start_cell(api: &Api, dir: &Path, id: &str) -> Server {
    start_cell_with(api, id, |token| cell_config(dir, id, &api.base, token))
}

/// [`start_cell`] with `env` for the cell's process.
fn start_cell_env(api: &Api, dir: &Path, id: &str, env: &[(&str, &str)]) -> Server {
    start_cell_full(api, id, |token| cell_config(dir, id, &api.base, token), env)
}

/// [`start_cell`] with the config `config(token)` writes.
fn start_cell_with(api: &Api, id: &str, config: impl FnOnce(&str) -> std::path::PathBuf) -> Server {
    start_cell_full(api, id, config, &[])
}

fn start_cell_full(api: &Api, id: &str, config: impl FnOnce(&str) -> std::path::PathBuf, env: &[(&str, &str)]) -> Server {
    api.ok("PUT", &format!("/api/cells/{id}"), Some(json!({"tier": "smb", "ingest_url": "http://127.0.0.1:9", "state": "provisioning"})));
    let token = api.ok("POST", &format!("/api/cells/{id}/token"), None)["token"].as_str().unwrap().to_owned();
    let server = Server::start_with_env(&config(&token), env);
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
    // No answer (a router being restarted): status 0, retried like any failure.
    let resp = match req.send() {
        Ok(r) => r,
        Err(e) => return (0, format!("{e:?}")),
    };
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
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("global.sqlite").display().to_string();
    let provisioned = Provisioned(dir.path().join("provisioned"));
    let (control, api) = start_control(dir.path(), &store, &provisioned.0, 3);

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

    // 2. A key straight to a cell that does not serve its workspace: 421, another cell's (a router
    //    routes again; an SDK is never told 401 for a valid key), and nothing stored.
    let c2_url = format!("http://{}", c2.as_ref().unwrap().addr);
    assert_eq!(send(&http, &c2_url, &acme_key, &ids("stray", 1), &[]).0, 421);
    assert_eq!(send(&http, &c2_url, "wk_nobody_has_this", &ids("stray", 1), &[]).0, 401, "a key nobody has is still 401");
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
    // The `[cell]` token: the last `token` of the file (`[admin]` has one before it).
    let c1_token = c1_token.lines().rev().find_map(|l| l.strip_prefix("token = \"")).unwrap().trim_end_matches('"').to_owned();
    let report = json!({"report_id": "replayed-1", "rows": [{"workspace": "acme", "hour": 0, "metric": "accepted", "value": 5}]});
    for expected in [true, false] {
        let resp = http.post(format!("{}/api/cells/c1/usage", api.base)).bearer_auth(&c1_token).json(&report).send().unwrap();
        assert_eq!(resp.json::<Value>().unwrap()["counted"], expected);
    }
    let at_zero = api.ok("GET", "/api/usage?workspace=acme&from=0&to=3600", None);
    assert_eq!(at_zero["totals"]["accepted"], 5, "{at_zero}");
    // Red team: c1 reporting usage of globex (c2's workspace) adds nothing to it.
    let forged = json!({"report_id": "forged-1", "rows": [{"workspace": "globex", "hour": 0, "metric": "accepted", "value": 1000000}]});
    let answer: Value = http.post(format!("{}/api/cells/c1/usage", api.base)).bearer_auth(&c1_token).json(&forged).send().unwrap().json().unwrap();
    assert_eq!(answer["refused_workspaces"], json!(["globex"]), "{answer}");
    assert_eq!(api.ok("GET", "/api/usage?workspace=globex&from=0&to=3600", None)["totals"], json!({}));
    // Another cell's token is not c1's.
    let resp = http.post(format!("{}/api/cells/c2/usage", api.base)).bearer_auth(&c1_token).json(&report).send().unwrap();
    assert_eq!(resp.status(), 401);

    // 5. The control plane down: the cells and the router serve on; usage waits on the cells' disks and arrives after.
    let control_config = control.config.clone();
    control.stop();
    let before = sink.by_message_id("/acme").len();
    assert_eq!(send(&http, &router_url, &acme_key, &ids("offline", 7), &[]).0, 200, "served without the control plane");
    delivered("/acme", before + 7);
    // A workspace placed meanwhile (in the store directly): its cell cannot check the key, so it asks the client to retry (503), never 401.
    {
        let direct = sluice_cells::GlobalStore::open(&store).unwrap();
        direct
            .put_workspace(&sluice_cells::Workspace {
                id: "late".into(),
                name: String::new(),
                tier: sluice_cells::Tier::Smb,
                constraints: Default::default(),
                disabled: false,
            })
            .unwrap();
        direct.add_write_key("wk_late_workspace_key", "late", "late-web").unwrap();
        direct.set_override("late", "c1", "testing").unwrap();
    }
    std::thread::sleep(Duration::from_millis(300)); // the router's next mapping poll
    assert_eq!(send(&http, &router_url, "wk_late_workspace_key", &ids("late", 1), &[]).0, 503, "retry, not 401: the key may be valid");
    std::thread::sleep(Duration::from_secs(2)); // a few report rounds fail meanwhile
    let control = Server::start_role("control", &control_config, &[("SLUICE_GLOBAL_STORE", &store)]);
    assert_eq!(send(&http, &router_url, "wk_late_workspace_key", &ids("late", 1), &[]).0, 200, "the retry is accepted");
    assert_eq!(format!("http://{}", control.addr), api.base, "back on its address");
    let acme_delivered = sink.by_message_id("/acme").len() as i64;
    wait_for(
        Duration::from_secs(30),
        || (totals(&api, "acme").get("delivered/acme-hook") == Some(&acme_delivered)).then_some(()),
        || format!("acme's usage {:?} caught up with {acme_delivered} delivered", totals(&api, "acme")),
    );

    // 6. Capacity: three workspaces fill an SMB cell (threshold 3); with both full, a third cell is provisioned.
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

    // 7. Bad input: a placement no cell satisfies says why; an unknown key and a disabled workspace get ingest's answers.
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

    // 8. A cell that stops: only its workspaces get 503; the others see no error.
    api.ok("PUT", "/api/workspaces/globex", Some(json!({"tier": "smb"})));
    c2.take().unwrap().stop();
    wait_for(
        Duration::from_secs(10),
        || (send(&http, &router_url, &globex_key, &ids("down", 1), &[]).0 == 503).then_some(()),
        || "globex 503 with its cell stopped".into(),
    );
    assert_eq!(send(&http, &router_url, &acme_key, &ids("still", 5), &[]).0, 200);

    // The Cells page is served (its data needs the token), and shows the cells in a browser.
    let page = http.get(format!("{}/", api.base)).send().unwrap();
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    assert!(page.text().unwrap().contains("Sluice cells"));
    let r = cells_page(&api);
    let texts = |k: &str| texts_of(&r, k);
    assert_eq!(r["asks_for_token"], true, "{r}");
    assert!(["c1", "c2", "smb-1"].iter().all(|c| texts("cells").contains(&c.to_string())), "every cell listed: {r}");
    assert!(texts("states").contains(&"full".to_owned()), "{r}");
    assert!(texts("load_labels").iter().any(|l| l.contains("workspaces 3 / 3")), "load against the threshold: {r}");
    assert!(texts("workspaces").iter().any(|w| w.starts_with("3: ")), "workspaces per cell: {r}");
    assert!(texts("decisions").contains(&"joined".to_owned()), "{r}");
    assert!(r["external_requests"].as_array().unwrap().is_empty(), "no external assets: {r}");
    // Each scrape reads the cell's CPU against the one before: there after two.
    let c1_load = || {
        let cells = api.ok("GET", "/api/cells", None);
        cells["cells"].as_array().unwrap().iter().find(|c| c["cell"]["id"] == "c1").unwrap()["load"].clone()
    };
    wait_for(
        Duration::from_secs(10),
        || (c1_load()["metrics"]["cpu"]["threshold"].as_f64() == Some(1.0)).then_some(()),
        || format!("c1's CPU read: {}", c1_load()),
    );
    drop(c1);
    drop(control);
}

/// Run the SDK script `kind` (`python` or `node`) against `host` for `pairs`
/// (write key, messageId prefix), `count` events each, `pace_ms` apart; what it sent.
fn run_sdk_cells(kind: &str, host: &str, count: usize, pairs: &[(String, String)], pace_ms: u64) -> std::process::Child {
    let env = sdk_env();
    let root = repo_root();
    let mut cmd = match kind {
        "python" => {
            let mut c = std::process::Command::new(&env["SLUICE_PYTHON"]);
            c.arg(root.join("tests/compat/python_cells.py"));
            c
        }
        _ => {
            let mut c = std::process::Command::new("node");
            c.arg(root.join("tests/compat/node_cells.mjs")).env("SLUICE_NODE_MODULES", &env["SLUICE_NODE_MODULES"]);
            c
        }
    };
    cmd.arg(host).arg(count.to_string()).env("SLUICE_SDK_PACE_MS", pace_ms.to_string());
    for (key, prefix) in pairs {
        cmd.arg(format!("{key}={prefix}"));
    }
    cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().expect("run the SDK script")
}

fn sdk_sent(kind: &str, child: std::process::Child) -> Vec<Value> {
    // Bounded: an SDK that never gives up fails the test instead of hanging it.
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    let Ok(out) = rx.recv_timeout(Duration::from_secs(180)) else {
        let _ = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status();
        panic!("the {kind} SDK script did not end within 180 s");
    };
    let out = out.expect("the SDK script ends");
    assert!(out.status.success(), "{kind} SDK run failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).expect("SDK script output")).collect()
}

/// A server that answers anything with bytes that are not HTTP.
fn garbage_server() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            use std::io::{Read, Write};
            let mut s = stream;
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"\x00\x01garbage, not HTTP\r\n\r\n");
        }
    });
    format!("http://{addr}")
}

#[test]
fn fifty_workspaces_from_the_sdks_through_two_routers_over_three_cells() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(store) = fresh_database("postgres", "cells_topology_store") else { return };
    let Some(jobdb) = fresh_database("postgres", "cells_topology_jobdb") else { return };
    let root = tempfile::tempdir().unwrap();
    let Some(broker) = Broker::start(&root.path().join("kafka"), "sluice-test-cells-topology") else { return };
    let provisioned = Provisioned(root.path().join("provisioned"));
    // SMB cells hold 20 workspaces: fifty over three cells leave none under 70% of that, so a fourth is provisioned.
    let (_control, api) = start_control(root.path(), &store, &provisioned.0, 20);
    let sink = TestSink::start();

    // Three cells: two embedded, one on Kafka + PostgreSQL.
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let c1 = start_cell(&api, dirs[0].path(), "c1");
    let c2 = start_cell(&api, dirs[1].path(), "c2");
    let mut c3 = Some(start_cell_with(&api, "c3", |token| {
        let extra = format!("[deliver]\njobdb_url = \"{jobdb}\"\ninitial_backoff = \"100ms\"\n{}", cell_toml("c3", &api.base, token));
        let config = write_kafka_config(dirs[2].path(), &broker, &extra);
        let text = std::fs::read_to_string(&config).unwrap().replacen("[server]\n", "[server]\ntrusted_proxies = [\"127.0.0.1\"]\n", 1);
        std::fs::write(&config, text).unwrap();
        config
    }));
    let routers: Vec<Server> = (0..2)
        .map(|i| {
            let config = root.path().join(format!("router{i}.toml"));
            std::fs::write(&config, "[router]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\npoll_interval = \"100ms\"\n").unwrap();
            Server::start_role("router", &config, &[("SLUICE_GLOBAL_STORE", &store)])
        })
        .collect();
    let mut routers = routers.into_iter().map(Some).collect::<Vec<_>>();
    let router_url = |r: &Option<Server>| format!("http://{}", r.as_ref().unwrap().addr);
    let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();

    // 1. Fifty workspaces, each with a source and a destination of its own.
    let keys: Vec<String> = (0..50).map(|i| make_workspace(&api, &format!("ws{i:02}"), &sink.sink.url(&format!("/ws{i:02}")))).collect();

    // 2. The SDKs send through the routers: Python's 25 workspaces through one, Node's through the other.
    let per_workspace = 20;
    let pairs = |range: std::ops::Range<usize>| -> Vec<(String, String)> { range.map(|i| (keys[i].clone(), format!("ws{i:02}"))).collect() };
    let python = run_sdk_cells("python", &router_url(&routers[0]), per_workspace, &pairs(0..25), 0);
    let node = run_sdk_cells("node", &router_url(&routers[1]), per_workspace, &pairs(25..50), 0);
    let mut sent = sdk_sent("python", python);
    sent.extend(sdk_sent("node", node));
    assert_eq!(sent.len(), 50 * per_workspace);

    // Every event is delivered once, to its own workspace's destination, and nothing else arrives there.
    for i in 0..50 {
        let path = format!("/ws{i:02}");
        wait_for(
            Duration::from_secs(60),
            || (sink.by_message_id(&path).len() >= per_workspace).then_some(()),
            || format!("{per_workspace} deliveries at {path}: {}", sink.by_message_id(&path).len()),
        );
        let got = sink.by_message_id(&path);
        assert_eq!(got.len(), per_workspace, "{path}: only its own events");
        assert!(got.iter().all(|(id, copies)| id.starts_with(&format!("ws{i:02}-")) && copies.len() == 1), "{path}: once each, its own");
    }
    // Each embedded cell's log holds exactly the events of the workspaces it serves.
    let placements: HashMap<String, String> = api.ok("GET", "/api/workspaces", None)["workspaces"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| Some((w["workspace"]["id"].as_str()?.to_owned(), w["served_by"]["cell"].as_str()?.to_owned())))
        .collect();
    for (cell, dir) in [("c1", dirs[0].path()), ("c2", dirs[1].path())] {
        let stored = read_input(&dir.join("data"));
        let mine = placements.values().filter(|c| *c == cell).count();
        assert!(mine > 0, "{cell} serves some workspaces: {placements:?}");
        assert_eq!(stored.len(), mine * per_workspace, "{cell}: the events of its {mine} workspaces, nothing else");
        for st in &stored {
            let ws = st.key.split('-').next().unwrap();
            assert_eq!(placements.get(ws).map(String::as_str), Some(cell), "{} stored in {cell}", st.key);
        }
    }
    assert!(placements.values().any(|c| c == "c3"), "the Kafka cell serves some: {placements:?}");
    // The Kafka + PostgreSQL cell's load includes its JobDB server's connections.
    let load_of = |cell: &str| {
        let cells = api.ok("GET", "/api/cells", None);
        cells["cells"].as_array().unwrap().iter().find(|c| c["cell"]["id"] == cell).map(|c| c["load"].clone()).unwrap_or_default()
    };
    wait_for(
        Duration::from_secs(30),
        || (load_of("c3")["metrics"]["db_connections"]["value"].as_f64().is_some_and(|v| v > 0.0 && v <= 1.0)).then_some(()),
        || format!("c3's database connections read: {}", load_of("c3")),
    );
    assert!(load_of("c1")["metrics"].get("db_connections").is_none(), "an embedded cell has no JobDB server");

    // 3. A threshold crossing provisions a fourth cell, and the next new workspaces land there.
    let decided = |kind: &str| -> Vec<Value> {
        api.ok("GET", "/api/decisions", None)["decisions"].as_array().unwrap().iter().filter(|d| d["kind"] == kind).cloned().collect()
    };
    wait_for(
        Duration::from_secs(90),
        || (!decided("joined").is_empty()).then_some(()),
        || format!("a fourth cell: {:?}", api.ok("GET", "/api/decisions", None)),
    );
    let fourth = decided("joined")[0]["cell"].as_str().unwrap().to_owned();
    let late_key = make_workspace(&api, "late", &sink.sink.url("/late"));
    let (status, at) = send(&http, &router_url(&routers[0]), &late_key, &ids("late", 3), &[]);
    assert_eq!((status, at.as_str()), (200, fourth.as_str()), "the next new workspace goes to the new cell");

    // 4. Two routers racing to place one new workspace agree on one cell.
    let racer_key = make_workspace(&api, "racer", &sink.sink.url("/racer"));
    let answers: Vec<(u16, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = routers
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let (http, url, key) = (&http, router_url(r), &racer_key);
                s.spawn(move || send(http, &url, key, &ids(&format!("racer{i}"), 1), &[]))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(answers[0].0, 200);
    assert_eq!(answers[0], answers[1], "one cell for both routers");

    // 5. kill -9 one router under traffic: the other serves every request.
    let survivor = router_url(&routers[1]);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (ok, failed) = std::thread::scope(|s| {
        let sender = s.spawn(|| {
            let (mut ok, mut failed, mut n) = (0, 0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                match send(&http, &survivor, &keys[0], &ids(&format!("live{n}"), 5), &[]).0 {
                    200 => ok += 1,
                    _ => failed += 1,
                }
            }
            (ok, failed)
        });
        std::thread::sleep(Duration::from_millis(500));
        routers[0].take().unwrap().kill9();
        std::thread::sleep(Duration::from_millis(1500));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        sender.join().unwrap()
    });
    assert!(ok > 0 && failed == 0, "the surviving router answered {ok} requests 200 and {failed} otherwise");

    // 5b. Move a workspace from an embedded cell to the Kafka + PostgreSQL cell under live traffic (issue 15).
    let mover = (0..50).rev().find(|i| placements.get(&format!("ws{i:02}")).map(String::as_str) == Some("c1")).unwrap();
    let mover_ws = format!("ws{mover:02}");
    let traffic = Traffic::start(&survivor, &keys[mover], &format!("{mover_ws}-mig"));
    std::thread::sleep(Duration::from_millis(500));
    // Forced: c3 may hold more than 70% of this test's small workspace threshold.
    let (status, m) = api.call("POST", "/api/migrations", Some(json!({"workspace": mover_ws, "to": "c3", "force": true})));
    assert_eq!(status, 201, "{m}");
    let m = wait_phase(&api, m["id"].as_str().unwrap(), "done", Duration::from_secs(120));
    assert!(m["cleanup"]["dedup_ids_deleted"].as_u64().unwrap() >= per_workspace as u64, "{m}");
    std::thread::sleep(Duration::from_millis(500));
    let (acked, cells) = traffic.finish();
    assert!(cells.contains_key("c1") && cells.contains_key("c3"), "traffic on both sides: {cells:?}");
    let mut want: std::collections::BTreeSet<String> = acked.into_iter().collect();
    want.extend((0..per_workspace).map(|n| format!("{mover_ws}-{n}")));
    delivered_once(&sink, &format!("/{mover_ws}"), &want);

    // 6. Stop one cell: only its workspaces get 503; the others see no error.
    let on = |cell: &str| (0..50).find(|i| placements.get(&format!("ws{i:02}")).map(String::as_str) == Some(cell)).unwrap();
    let (kafka_ws, embedded_ws) = (on("c3"), on("c1"));
    c3.take().unwrap().stop();
    assert_eq!(send(&http, &survivor, &keys[kafka_ws], &ids("down", 1), &[]).0, 503);
    assert_eq!(send(&http, &survivor, &keys[embedded_ws], &ids("up", 1), &[]).0, 200);

    // 7. Metering: each workspace's delivered total is what its destination received.
    for i in [0, 25, 49] {
        let ws = format!("ws{i:02}");
        let received = || sink.by_message_id(&format!("/{ws}")).len() as i64;
        wait_for(
            Duration::from_secs(30),
            || (totals(&api, &ws).get(&format!("delivered/{ws}-hook")) == Some(&received())).then_some(()),
            || format!("{ws}'s usage {:?} against {} received", totals(&api, &ws), received()),
        );
    }

    // 8. Bad input: a cell URL that answers garbage, a placement no cell satisfies.
    api.ok("PUT", "/api/cells/junk", Some(json!({"tier": "smb", "ingest_url": garbage_server(), "state": "full"})));
    let victim_key = make_workspace(&api, "victim", &sink.sink.url("/victim"));
    api.ok("PUT", "/api/workspaces/victim/override", Some(json!({"cell": "junk", "reason": "testing a bad cell"})));
    let (status, at) = send(&http, &survivor, &victim_key, &ids("victim", 2), &[]);
    assert_eq!((status, at.as_str()), (503, ""), "a garbage answer is not relayed");
    api.ok("PUT", "/api/workspaces/eu-only", Some(json!({"tier": "smb", "constraints": {"data_residency": "eu"}})));
    let (_, made) = api.call("POST", "/api/workspaces/eu-only/sources", Some(json!({"id": "eu-only-web"})));
    let (status, _) = send(&http, &survivor, made["write_key"].as_str().unwrap(), &ids("eu", 1), &[]);
    assert_eq!(status, 503, "no cell satisfies it: the SDK retries later");
    let (status, why) = api.call("POST", "/api/workspaces/eu-only/place", None);
    assert_eq!(status, 409);
    assert!(why["message"].as_str().unwrap().contains("data_residency"), "{why}");
    assert!(sink.by_message_id("/victim").is_empty());
    drop((c1, c2));
}

/// The Cells page in headless Chromium (`tests/console/cells_page_test.mjs`): its results.
fn cells_page(api: &Api) -> Value {
    let (chromium, modules) = browser_env();
    let out = std::process::Command::new("node")
        .arg(repo_root().join("tests/console/cells_page_test.mjs"))
        .args([&api.base, TOKEN, screenshot_dir().to_str().unwrap()])
        .env("SLUICE_CHROMIUM", &chromium)
        .env("SLUICE_BROWSER_MODULES", &modules)
        .output()
        .expect("run node");
    assert!(out.status.success(), "cells page test failed:\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap()
}

fn texts_of(r: &Value, k: &str) -> Vec<String> {
    r[k].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect()
}

/// Live traffic of one workspace through a router, as an SDK sends it:
/// batches of unique ids, each retried until it is acknowledged, and every
/// 50th batch followed by a resend of an earlier one (~1% of events sent twice).
struct Traffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    acked: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    cells: std::sync::Arc<std::sync::Mutex<HashMap<String, u64>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(router: &str, key: &str, prefix: &str) -> Traffic {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let stop = Arc::new(AtomicBool::new(false));
        let acked: Arc<Mutex<Vec<String>>> = Arc::default();
        let cells: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
        let (router, key, prefix) = (router.to_owned(), key.to_owned(), prefix.to_owned());
        let (s, a, c) = (stop.clone(), acked.clone(), cells.clone());
        let thread = std::thread::spawn(move || {
            let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
            let mut sent: Vec<Vec<String>> = Vec::new();
            let mut n = 0;
            while !s.load(Ordering::Relaxed) {
                let batch = ids(&format!("{prefix}{n}"), 10);
                let mut todo = vec![batch.clone()];
                if n % 50 == 49 {
                    todo.push(sent[n / 2].clone());
                }
                for b in todo {
                    // Retried until acknowledged, as the SDKs do (a 503 during a cutover is allowed, a loss is not).
                    let since = std::time::Instant::now();
                    let mut last = (0, String::new());
                    loop {
                        assert!(since.elapsed() < Duration::from_secs(120), "a batch not acknowledged in 120 s (last answer {last:?}): {b:?}");
                        let (status, cell) = send(&http, &router, &key, &b, &[]);
                        last = (status, cell.clone());
                        if status == 200 {
                            *c.lock().unwrap().entry(cell).or_default() += 1;
                            a.lock().unwrap().extend(b.iter().cloned());
                            break;
                        }
                        assert_ne!(status, 400, "a valid batch refused");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
                sent.push(batch);
                n += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Traffic { stop, acked, cells, thread: Some(thread) }
    }

    /// Stop; the ids acknowledged (with repeats) and the answers per cell.
    fn finish(mut self) -> (Vec<String>, HashMap<String, u64>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().expect("the traffic thread");
        (self.acked.lock().unwrap().clone(), self.cells.lock().unwrap().clone())
    }
}

/// Every id in `want` delivered at `path`, each once, and nothing else (a moment
/// after the last arrived, for late repeats).
fn delivered_once(sink: &TestSink, path: &str, want: &std::collections::BTreeSet<String>) {
    wait_for(
        Duration::from_secs(60),
        || Some(sink.by_message_id(path)).filter(|d| want.iter().all(|id| d.contains_key(id))),
        || format!("{} acknowledged events delivered at {path}", want.len()),
    );
    std::thread::sleep(Duration::from_secs(2));
    let got = sink.by_message_id(path);
    let twice: Vec<_> = got.iter().filter(|(_, v)| v.len() > 1).map(|(k, v)| (k, v.len())).collect();
    assert!(twice.is_empty(), "{path}: delivered more than once: {twice:?}");
    assert_eq!(got.len(), want.len(), "{path}: nothing delivered that was not acknowledged");
}

/// Wait until the control plane has read `cell`'s load in full (CPU takes two scrapes): a move into it may start.
fn wait_read_in_full(api: &Api, cell: &str) {
    let load = || {
        let cells = api.ok("GET", "/api/cells", None);
        cells["cells"].as_array().unwrap().iter().find(|c| c["cell"]["id"] == cell).map(|c| c["load"].clone()).unwrap_or_default()
    };
    wait_for(Duration::from_secs(30), || load()["metrics"]["cpu"].is_object().then_some(()), || format!("{cell}'s load read in full: {}", load()));
}

fn migration(api: &Api, id: &str) -> Value {
    api.ok("GET", &format!("/api/migrations/{id}"), None)
}

fn wait_phase(api: &Api, id: &str, phase: &str, timeout: Duration) -> Value {
    wait_for(timeout, || Some(migration(api, id)).filter(|m| m["phase"] == phase), || format!("migration in phase {phase}: {}", migration(api, id)))
}

#[test]
fn a_workspace_moves_between_cells_under_live_traffic_losing_nothing_and_delivering_nothing_twice() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("global.sqlite").display().to_string();
    let provisioned = Provisioned(dir.path().join("provisioned"));
    let (control, api) = start_control_with(dir.path(), &store, &provisioned.0, 100, "migration_step_interval = \"1s\"\n");
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // The source cell's dedup can be held (a pause point) to make the race certain.
    let pause = dir.path().join("pause-dedup");
    let c1 = start_cell_env(&api, dir_a.path(), "c1", &[("SLUICE_TEST_PAUSE_FILE", pause.to_str().unwrap())]);
    let c2 = start_cell(&api, dir_b.path(), "c2");
    let router_dir = tempfile::tempdir().unwrap();
    let router_config = router_dir.path().join("router.toml");
    // A fixed port (free now): the router is killed and restarted in phase 3, its clients keep their URL.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    std::fs::write(&router_config, format!("[router]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:0\"\npoll_interval = \"100ms\"\n"))
        .unwrap();
    let router = Server::start_role("router", &router_config, &[("SLUICE_GLOBAL_STORE", &store)]);
    let router_url = format!("http://{}", router.addr);
    let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let sink = TestSink::start();

    // Phase 1, a one-step move of "mover" from c1 to c2. Two workspaces, one per cell; "mover" is in c1 with events already accepted (and deduplicated) there.
    let key = make_workspace(&api, "mover", &sink.sink.url("/mover"));
    assert_eq!(send(&http, &router_url, &key, &ids("pre", 200), &[]), (200, "c1".to_owned()));
    let other_key = make_workspace(&api, "stays", &sink.sink.url("/stays"));
    assert_eq!(send(&http, &router_url, &other_key, &ids("other", 10), &[]), (200, "c2".to_owned()));
    wait_for(Duration::from_secs(30), || (sink.by_message_id("/mover").len() >= 200).then_some(()), || "the first 200 delivered".into());

    // Bad requests: an unknown cell, a workspace not placed, steps that make no sense, no token.
    assert_eq!(api.call("POST", "/api/migrations", Some(json!({"workspace": "mover", "to": "nowhere"}))).0, 404);
    assert_eq!(api.call("POST", "/api/migrations", Some(json!({"workspace": "mover", "to": "c2", "steps": [50]}))).0, 400);
    assert_eq!(api.call("POST", "/api/migrations", Some(json!({"workspace": "mover", "to": "c1"}))).0, 400);
    assert_eq!(api.call("POST", "/api/migrations", Some(json!({"workspace": "mover", "to": "c2", "surprise": 1}))).0, 400);
    assert_eq!(api.call("POST", "/api/migrations", Some(json!({"workspace": "mover", "to": "c2", "copy_rate": 0}))).0, 400);
    assert_eq!(api.http.get(format!("{}/api/migrations", api.base)).send().unwrap().status(), 401);

    // A target whose load the control plane has not read yet: refused, unless forced (not done here).
    let (status, early) = api.call("POST", "/api/migrations", Some(json!({"workspace": "mover", "to": "c2"})));
    if status == 400 {
        assert!(early["message"].as_str().unwrap().contains("not been read yet"), "{early}");
    } else {
        // The control plane was quicker than this test: that migration is the one to abort.
        assert_eq!(status, 201, "{early}");
        api.ok("POST", &format!("/api/migrations/{}/abort", early["id"].as_str().unwrap()), None);
    }
    wait_read_in_full(&api, "c2");

    // An operator's QoS change on c1 for the workspace's destination: it must come along.
    let qos = http
        .put(format!("http://{}/api/qos/mover-hook", c1.admin))
        .bearer_auth(CELL_ADMIN_TOKEN)
        .json(&json!({"priority": 7, "max_in_flight": 3}))
        .send()
        .unwrap();
    assert_eq!(qos.status(), 200, "{}", qos.text().unwrap());

    // Live traffic for the whole move.
    let traffic = Traffic::start(&router_url, &key, "live");
    std::thread::sleep(Duration::from_secs(1));

    // 1. Start paused: keys are copied, nothing is cut over.
    let (status, m) = api.call("POST", "/api/migrations", Some(json!({"workspace": "mover", "to": "c2", "paused": true, "copy_rate": 100_000})));
    assert_eq!(status, 201, "{m}");
    let id = m["id"].as_str().unwrap().to_owned();
    assert_eq!(api.call("POST", "/api/migrations", Some(json!({"workspace": "mover", "to": "c2"}))).0, 400, "one migration per workspace at a time");
    wait_for(
        Duration::from_secs(30),
        || Some(migration(&api, &id)).filter(|m| m["progress"]["source"]["snapshot_done"] == true && m["progress"]["target"]["ready"] == true),
        || format!("the snapshot copied: {}", migration(&api, &id)),
    );
    let m = migration(&api, &id);
    assert!(m["keys_copied"].as_u64().unwrap() >= 200, "the 200 events deduplicated before the move are among the keys: {m}");
    assert_eq!(m["phase"], "copying");
    let bad_token = http.post(format!("http://{}/cell/migrations/{id}/keys", c2.admin)).bearer_auth("wrong").body("mover-web/x\t1").send().unwrap();
    assert_eq!(bad_token.status(), 401, "the cells' key endpoint takes the migration's token only");
    // Where the workspace is served cannot change under the migration.
    assert_eq!(api.call("DELETE", "/api/workspaces/mover/override", None).0, 400);
    assert_eq!(api.call("PUT", "/api/workspaces/mover/override", Some(json!({"cell": "c2"}))).0, 400);

    // 2. The race: c1 acknowledges X, its dedup has not read X when the mapping flips, the client resends X to c2.
    std::fs::write(&pause, b"").unwrap();
    let race = ids("race", 5);
    assert_eq!(send(&http, &router_url, &key, &race, &[]), (200, "c1".to_owned()));
    // The official Python SDK sends across the cutover too (~3 s of events, 10 ms apart).
    let python = run_sdk_cells("python", &router_url, 300, &[(key.clone(), "py".to_owned())], 10);
    std::thread::sleep(Duration::from_millis(500));
    api.ok("POST", &format!("/api/migrations/{id}/resume"), None);
    let m = wait_phase(&api, &id, "draining", Duration::from_secs(60));
    assert_eq!(m["buckets_moved"], 100);
    let (status, at) = send(&http, &router_url, &key, &race, &[]);
    assert_eq!((status, at.as_str()), (200, "c2"), "the resend goes to the target, which drops it");
    // c1's dedup goes on; c1 delivers X (once) and drains.
    std::fs::remove_file(&pause).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let (acked, cells) = traffic.finish();
    assert!(
        cells.get("c1").copied().unwrap_or(0) > 0 && cells.get("c2").copied().unwrap_or(0) > 0,
        "traffic on both sides of the cutover: {cells:?}"
    );
    let py_sent: Vec<String> = sdk_sent("python", python).iter().map(|e| e["messageId"].as_str().unwrap().to_owned()).collect();
    assert_eq!(py_sent.len(), 300);
    let m = wait_phase(&api, &id, "done", Duration::from_secs(60));
    assert_eq!(m["cleanup"]["done"], true, "{m}");
    // The source removed the workspace's dedup ids (every id it had accepted, less what expired: nothing here).
    assert!(m["cleanup"]["dedup_ids_deleted"].as_u64().unwrap() >= 205, "{m}");

    // Every acknowledged event delivered, none twice.
    let mut want: std::collections::BTreeSet<String> = acked.into_iter().collect();
    want.extend(ids("pre", 200));
    want.extend(race.iter().cloned());
    want.extend(py_sent);
    delivered_once(&sink, "/mover", &want);
    // The other workspace was not disturbed.
    assert_eq!(sink.by_message_id("/stays").len(), 10);
    // c2 has c1's QoS row for the destination.
    let rows: Value = http.get(format!("http://{}/api/qos", c2.admin)).bearer_auth(CELL_ADMIN_TOKEN).send().unwrap().json().unwrap();
    let row = rows.as_array().unwrap().iter().find(|r| r["destination"] == "mover-hook").cloned().unwrap_or_default();
    assert_eq!((&row["priority"], &row["max_in_flight"], &row["paused"]), (&json!(7), &json!(3), &json!(false)), "{rows}");

    // After the move: the router sends the workspace to c2, c1 no longer knows it.
    assert_eq!(send(&http, &router_url, &key, &ids("after", 3), &[]), (200, "c2".to_owned()));
    // Straight to c1 (a stale router would do this): 421, never a 401 the SDKs would drop events on.
    assert_eq!(send(&http, &format!("http://{}", c1.addr), &key, &ids("stray", 1), &[]).0, 421);
    // The CLI shows it done.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["migrate", "status", &id, "--control", &api.base])
        .env("SLUICE_CONTROL_TOKEN", TOKEN)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("done") && text.contains("c1 -> c2"), "{text} {}", String::from_utf8_lossy(&out.stderr));
    // And the Cells page lists it with its phase and buckets.
    let r = cells_page(&api);
    assert_eq!((texts_of(&r, "migration_workspaces"), texts_of(&r, "migration_phases")), (vec!["mover".to_owned()], vec!["done".to_owned()]), "{r}");
    assert!(texts_of(&r, "migration_buckets")[0].starts_with("100/100"), "{r}");

    // Phase 2, a gradual move of "stays" from c2 to c1 (10% -> 50% -> 100%) under traffic (the official
    // Node SDK's across the first cutover), with the control plane killed (-9) after the first step,
    // the move held while the target is over a threshold, and the source cell killed after the second step.
    let traffic = Traffic::start(&router_url, &other_key, "grad");
    let node = run_sdk_cells("node", &router_url, 300, &[(other_key.clone(), "nd".to_owned())], 15);
    std::thread::sleep(Duration::from_millis(500));
    let (status, m) = api.call("POST", "/api/migrations", Some(json!({"workspace": "stays", "to": "c1", "steps": [10, 50, 100]})));
    assert_eq!(status, 201, "{m}");
    let id2 = m["id"].as_str().unwrap().to_owned();
    let at_step = |n: u64| {
        wait_for(
            Duration::from_secs(60),
            || Some(migration(&api, &id2)).filter(|m| m["step"].as_u64() >= Some(n)),
            || format!("step {n}: {}", migration(&api, &id2)),
        )
    };
    let m = at_step(1);
    assert_eq!(m["buckets_moved"], 10, "{m}");
    control.kill9();
    std::thread::sleep(Duration::from_secs(1));
    // It comes back with a CPU threshold every cell is over (and no provisioner): the move holds before step 2.
    let normal = std::fs::read_to_string(dir.path().join("control.toml")).unwrap();
    let strict: String = normal
        .lines()
        .filter(|l| !l.starts_with("provision_"))
        .map(|l| if l == "cpu = 1.0" { "cpu = 0.001\n".to_owned() } else { format!("{l}\n") })
        .collect();
    assert_ne!(strict, normal);
    std::fs::write(dir.path().join("control-strict.toml"), strict).unwrap();
    let control = Server::start_role("control", &dir.path().join("control-strict.toml"), &[("SLUICE_GLOBAL_STORE", &store)]);
    let m = wait_for(
        Duration::from_secs(60),
        || Some(migration(&api, &id2)).filter(|m| m["paused"] == true),
        || format!("the move held: {}", migration(&api, &id2)),
    );
    let why = m["error"].as_str().unwrap();
    assert!(why.contains("held before step") && why.contains("cell c1") && why.contains("cpu"), "{m}");
    std::thread::sleep(Duration::from_secs(2));
    let later = migration(&api, &id2);
    assert_eq!((&later["buckets_moved"], &later["phase"]), (&m["buckets_moved"], &json!("copying")), "nothing more moved while held: {later}");
    let nd_sent: Vec<String> = sdk_sent("node", node).iter().map(|e| e["messageId"].as_str().unwrap().to_owned()).collect();
    assert_eq!(nd_sent.len(), 300);
    // The usual thresholds again; the cells the strict ones marked full are put back, the operator resumes.
    drop(control);
    let _control = Server::start_role("control", &dir.path().join("control.toml"), &[("SLUICE_GLOBAL_STORE", &store)]);
    for cell in ["c1", "c2"] {
        api.ok("POST", &format!("/api/cells/{cell}/state"), Some(json!({"state": "active"})));
    }
    let m = api.ok("POST", &format!("/api/migrations/{id2}/resume"), None);
    assert_eq!((m["paused"].as_bool(), m["error"].as_str()), (Some(false), Some("")), "resuming clears the hold: {m}");
    let m = at_step(2);
    assert_eq!(m["buckets_moved"], 50, "resumed after the control plane's restart: {m}");
    c2.kill9();
    let c2 = Server::start(&dir_b.path().join("sluice.toml"));
    api.ok(
        "PUT",
        "/api/cells/c2",
        Some(json!({"tier": "smb", "ingest_url": format!("http://{}", c2.addr), "admin_url": format!("http://{}", c2.admin)})),
    );
    let m = wait_phase(&api, &id2, "done", Duration::from_secs(120));
    assert_eq!(m["buckets_moved"], 100);
    let (acked, cells) = traffic.finish();
    assert!(cells.get("c1").copied().unwrap_or(0) > 0 && cells.get("c2").copied().unwrap_or(0) > 0, "{cells:?}");
    let mut want: std::collections::BTreeSet<String> = acked.into_iter().collect();
    want.extend(ids("other", 10));
    want.extend(nd_sent);
    delivered_once(&sink, "/stays", &want);
    let router_metrics = http.get(format!("http://{}/metrics", router.admin)).send().unwrap().text().unwrap();
    let split = router_metrics.lines().find_map(|l| l.strip_prefix("sluice_router_split_batches_total ")).and_then(|v| v.trim().parse::<f64>().ok());
    assert!(split.unwrap_or(0.0) > 0.0, "batches spanning both cells were split: {split:?}");

    // Phase 3, a chained move: "mover" came to c2 minutes ago (c2 lists that ended migration as
    // its target) and moves on to a third cell, under traffic, resends included.
    let dir_c = tempfile::tempdir().unwrap();
    let c3 = start_cell(&api, dir_c.path(), "c3");
    wait_read_in_full(&api, "c3");
    assert_eq!(
        api.call("POST", "/api/migrations", Some(json!({"workspace": "mover", "to": "c1"}))).0,
        400,
        "not straight back into c1 (it cleaned the workspace up minutes ago)"
    );
    let before: std::collections::BTreeSet<String> = sink.by_message_id("/mover").into_keys().collect();
    let traffic = Traffic::start(&router_url, &key, "chain");
    std::thread::sleep(Duration::from_millis(500));
    let (status, m) = api.call("POST", "/api/migrations", Some(json!({"workspace": "mover", "to": "c3", "steps": [50, 100]})));
    assert_eq!(status, 201, "{m}");
    let id3 = m["id"].as_str().unwrap().to_owned();
    // After the first step: the router and the target killed (-9) and restarted; clients retry meanwhile.
    wait_for(
        Duration::from_secs(60),
        || Some(migration(&api, &id3)).filter(|m| m["step"].as_u64() >= Some(1)),
        || format!("step 1: {}", migration(&api, &id3)),
    );
    router.kill9();
    c3.kill9();
    let router = Server::start_role("router", &router_config, &[("SLUICE_GLOBAL_STORE", &store)]);
    let c3 = Server::start(&dir_c.path().join("sluice.toml"));
    api.ok(
        "PUT",
        "/api/cells/c3",
        Some(json!({"tier": "smb", "ingest_url": format!("http://{}", c3.addr), "admin_url": format!("http://{}", c3.admin)})),
    );
    wait_phase(&api, &id3, "done", Duration::from_secs(120));
    let (acked, cells) = traffic.finish();
    assert!(cells.get("c3").copied().unwrap_or(0) > 0, "{cells:?}");
    let mut want = before;
    want.extend(acked);
    delivered_once(&sink, "/mover", &want);
    // Straight to c2 now: another cell's, 421.
    assert_eq!(send(&http, &format!("http://{}", c2.addr), &key, &ids("stray2", 1), &[]).0, 421);

    // A replay on c3 covers the workspace's events in every cell it passed through (c1 and c2's
    // logs, then c3's own): each acknowledged event delivered once more, none more than that.
    let admin = |path: &str| format!("http://{}{path}", c3.admin);
    let r: Value = http
        .post(admin("/api/replays"))
        .bearer_auth(CELL_ADMIN_TOKEN)
        .json(&json!({"destination": "mover-hook", "since_ms": 0}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let rid = r["id"].as_i64().unwrap_or_else(|| panic!("{r}"));
    // An earlier cell's log is read with the migration's token only.
    let stolen = http
        .get(format!("http://{}/cell/migrations/{id}/history?partition=0&workspace=mover&sources=mover-web", c1.admin))
        .bearer_auth("hist_guess")
        .send()
        .unwrap();
    assert_eq!(stolen.status(), 401);
    // Nor while a workspace moves: the replay fails before it routes anything (the other side's part would be missing).
    let (status, m) = api.call("POST", "/api/migrations", Some(json!({"workspace": "stays", "to": "c3", "paused": true, "force": true})));
    assert_eq!(status, 201, "{m}");
    let moving = m["id"].as_str().unwrap().to_owned();
    let refused: Value = http
        .post(format!("http://{}/api/replays", c1.admin))
        .bearer_auth(CELL_ADMIN_TOKEN)
        .json(&json!({"destination": "stays-hook", "since_ms": 0}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let refused_id = refused["id"].as_i64().unwrap();
    let refused_state =
        || http.get(format!("http://{}/api/replays/{refused_id}", c1.admin)).bearer_auth(CELL_ADMIN_TOKEN).send().unwrap().json::<Value>().unwrap();
    let failed = wait_for(Duration::from_secs(60), || Some(refused_state()).filter(|r| r["state"] == "failed"), || format!("{}", refused_state()));
    assert!(failed["error"].as_str().unwrap().contains("is moving") && failed["jobs"] == 0, "{failed}");
    api.ok("POST", &format!("/api/migrations/{moving}/abort"), None);
    let replay = || http.get(admin(&format!("/api/replays/{rid}"))).bearer_auth(CELL_ADMIN_TOKEN).send().unwrap().json::<Value>().unwrap();
    let done = wait_for(
        Duration::from_secs(60),
        || Some(replay()).filter(|r| r["state"] == "done" || r["state"] == "failed"),
        || format!("the replay: {}", replay()),
    );
    assert_eq!((&done["state"], done["events"].as_u64()), (&json!("done"), Some(want.len() as u64)), "every event in one cell's log: {done}");
    wait_for(
        Duration::from_secs(60),
        || Some(sink.by_message_id("/mover")).filter(|d| want.iter().all(|id| d.get(id).is_some_and(|v| v.len() >= 2))),
        || "every acknowledged event delivered again".into(),
    );
    std::thread::sleep(Duration::from_secs(2));
    let got = sink.by_message_id("/mover");
    let odd: Vec<_> = got.iter().filter(|(_, v)| v.len() != 2).map(|(k, v)| (k, v.len())).collect();
    assert!(odd.is_empty() && got.len() == want.len(), "each event delivered exactly twice (once, then the replay): {odd:?}");
    drop((c2, c3, router));
}
