//! Harness for tests that run the real `sluice` binary (ripgrep's
//! `tests/util.rs` style): start it on free ports, wait until it is ready,
//! kill it (gracefully or with SIGKILL), and read its log back.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_log::EmbeddedLog;

pub const WRITE_KEY: &str = "wk_test_web";
pub const SOURCE_ID: &str = "web";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repo root")
}

/// A config file for a test server in `dir`, with `extra` TOML appended.
pub fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("sluice.toml");
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
data_dir = "{data}"

[admin]
listen = "127.0.0.1:0"

[log]
partitions = 4

[[sources]]
id = "{SOURCE_ID}"
write_key = "{WRITE_KEY}"
{extra}
"#,
        data = dir.join("data").display()
    );
    std::fs::write(&path, text).expect("write config");
    path
}

/// Config TOML for a webhook destination `hook` at `url` (private network
/// allowed), connected to the test source.
pub fn hook_destination_toml(url: &str) -> String {
    format!(
        "[[destinations]]\nid = \"hook\"\nurl = \"{url}\"\nallow_private_network = true\n\
         [[connections]]\nsource = \"{SOURCE_ID}\"\ndestinations = [\"hook\"]\n"
    )
}

/// Put `token` into the `[admin]` table of a config from [`write_config`].
pub fn set_admin_token(config: &Path, token: &str) {
    let text = std::fs::read_to_string(config).expect("read config");
    std::fs::write(config, text.replacen("[admin]\n", &format!("[admin]\ntoken = \"{token}\"\n"), 1)).expect("write config");
}

/// A running `sluice serve`.
pub struct Server {
    child: Child,
    pub addr: String,
    pub admin: String,
    pub config: PathBuf,
    pub stderr: Arc<Mutex<Vec<String>>>,
    /// The thread copying stderr into `stderr`; it ends when the process does.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Start the binary with `config` and wait for its ready line.
    pub fn start(config: &Path) -> Server {
        Self::start_with_env(config, &[])
    }

    /// Start the binary with `config` and extra environment variables (e.g.
    /// `SLUICE_CRASH_AT`), and wait for its ready line.
    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Server {
        Self::start_role("serve", config, env)
    }

    /// Start `sluice <command>` (`serve`, or a role: `ingest`, `dedup`,
    /// `route`, `director`) with `config`, and wait for its ready line.
    pub fn start_role(command: &str, config: &Path, env: &[(&str, &str)]) -> Server {
        Self::try_start_role(command, config, env).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Self::start_role`], with `Err` (the process killed, its stderr in
    /// the message) when it does not become ready within 60 s.
    pub fn try_start_role(command: &str, config: &Path, env: &[(&str, &str)]) -> Result<Server, String> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
        cmd.args(["--log-format", "json", command, "--config"])
            .arg(config)
            .env_remove("SLUICE_CRASH_AT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start sluice");
        let stderr = child.stderr.take().expect("stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let msg = v["fields"]["message"].as_str().unwrap_or("");
                    if msg.starts_with("Sluice is ready") {
                        let f = &v["fields"];
                        let _ = ready_tx.send((f["listen"].as_str().unwrap_or("").to_owned(), f["admin"].as_str().unwrap_or("").to_owned()));
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        match ready_rx.recv_timeout(Duration::from_secs(60)) {
            Ok((addr, admin)) => Ok(Server { child, addr, admin, config: config.to_owned(), stderr: lines, reader: Some(reader) }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = reader.join();
                let text = lines.lock().unwrap().join("\n");
                Err(format!("sluice did not become ready; stderr:\n{text}"))
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The process id of the child.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no graceful exit, no flush.
    pub fn kill9(mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reap");
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(mut self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "sluice exited with {status}; stderr:\n{}", self.stderr.lock().unwrap().join("\n"));
    }

    /// Wait up to `timeout` for the process to exit by itself (a crash point
    /// aborting it, say). On exit, waits for its stderr to be read to the
    /// end, so [`Self::stderr_text`] holds its last words. `None` if it is
    /// still running at the deadline (it is left running).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// The last `n` stderr lines, for panic messages.
    pub fn stderr_tail(&self, n: usize) -> String {
        let lines = self.stderr.lock().unwrap();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The JSON log lines of stderr (non-JSON lines, e.g. a crash point's
    /// message, are skipped).
    pub fn json_log(&self) -> Vec<Value> {
        self.stderr.lock().unwrap().iter().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A stored event with its record key.
#[derive(Debug, Clone)]
pub struct Stored {
    pub key: String,
    pub partition: u32,
    pub event: Value,
}

/// Every record of the `input` topic under `data_dir`, all partitions.
pub fn read_input(data_dir: &Path) -> Vec<Stored> {
    read_topic(data_dir, "input")
}

/// Every record of `topic` under `data_dir`, all partitions, in partition
/// then offset order. Works beside a running server (read-only view).
pub fn read_topic(data_dir: &Path, topic: &str) -> Vec<Stored> {
    let log = EmbeddedLog::open_read_only(&data_dir.join("log")).expect("open log read-only");
    let mut out = Vec::new();
    let partitions = sluice_log::Log::partitions(&log, topic).unwrap_or_else(|e| panic!("topic {topic}: {e}"));
    for p in 0..partitions {
        let range = log.offsets_blocking(topic, p).expect("offsets");
        let mut next = range.start;
        loop {
            let batch = log.read_blocking(topic, p, next, 10_000).expect("read");
            let Some(last) = batch.last() else { break };
            next = last.offset + 1;
            for r in batch {
                let event = serde_json::from_slice(&r.value).expect("stored value is JSON");
                out.push(Stored { key: String::from_utf8(r.key.to_vec()).expect("utf8 key"), partition: p, event });
            }
        }
    }
    out
}

/// How far dedup has got on one partition of `input`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupLag {
    pub partition: u32,
    /// The `dedup` group's committed offset on `input` (None: never committed).
    pub committed: Option<u64>,
    /// `input`'s readable range.
    pub start: u64,
    pub end: u64,
}

impl DedupLag {
    pub fn drained(&self) -> bool {
        self.committed.unwrap_or(self.start) >= self.end
    }
}

/// The committed `dedup` offset and the end of `input`, per partition, read
/// beside a running server.
pub fn dedup_lag(data_dir: &Path) -> Vec<DedupLag> {
    let log = EmbeddedLog::open_read_only(&data_dir.join("log")).expect("open log read-only");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let partitions = sluice_log::Log::partitions(&log, "input").expect("input topic");
    (0..partitions)
        .map(|p| {
            let range = log.offsets_blocking("input", p).expect("offsets");
            let committed = rt.block_on(sluice_log::Log::committed(&log, "dedup", "input", p)).expect("committed offset");
            DedupLag { partition: p, committed, start: range.start, end: range.end }
        })
        .collect()
}

/// Poll until, on every partition, the `dedup` group's committed offset on
/// `input` equals `input`'s end; `Err` with the last state at the deadline.
pub fn try_wait_for_dedup_drained(data_dir: &Path, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let lag = dedup_lag(data_dir);
        if lag.iter().all(DedupLag::drained) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("dedup did not drain input within {timeout:?}: {lag:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// [`try_wait_for_dedup_drained`], panicking at the deadline.
pub fn wait_for_dedup_drained(data_dir: &Path, timeout: Duration) {
    if let Err(e) = try_wait_for_dedup_drained(data_dir, timeout) {
        panic!("{e}");
    }
}

/// Stored events by messageId; panics on a duplicate messageId.
pub fn by_message_id(stored: &[Stored]) -> HashMap<String, Stored> {
    let mut map = HashMap::new();
    for s in stored {
        let id = s.event["messageId"].as_str().expect("messageId").to_owned();
        assert!(map.insert(id.clone(), s.clone()).is_none(), "messageId {id} stored twice");
    }
    map
}

/// Paths of the installed Segment SDKs; installs them (scripts/setup-compat.sh)
/// when the environment does not name them.
pub fn sdk_env() -> HashMap<String, String> {
    let mut env = HashMap::new();
    for k in ["SLUICE_PYTHON", "SLUICE_NODE_MODULES"] {
        if let Ok(v) = std::env::var(k) {
            env.insert(k.to_owned(), v);
        }
    }
    if env.len() < 2 {
        let out = Command::new("bash")
            .arg(repo_root().join("scripts/setup-compat.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/setup-compat.sh");
        assert!(out.status.success(), "scripts/setup-compat.sh failed");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some((k, v)) = line.split_once('=') {
                env.insert(k.to_owned(), v.to_owned());
            }
        }
    }
    env
}

/// The checks every SDK compatibility test makes of one stored event against
/// what the SDK script reported sending (`messageId`, `type`, `userId`, `i`):
/// key, partition (4 partitions), library, no `writeKey`, and the fields
/// `tests/compat/*` set for each call type.
pub fn check_sdk_event(st: &Stored, sent: &Value, library: &str) {
    let id = sent["messageId"].as_str().unwrap();
    let ev = &st.event;
    let ty = sent["type"].as_str().unwrap();
    let i = sent["i"].as_u64().unwrap();
    assert_eq!(st.key, format!("{SOURCE_ID}/{id}"));
    assert_eq!(st.partition, sluice_core::partition_for(id, 4), "partition of {id}");
    assert_eq!(ev["type"], ty, "{ev}");
    assert_eq!(ev["userId"], sent["userId"], "{ev}");
    assert_eq!(ev["context"]["library"]["name"], library, "{ev}");
    assert!(ev.get("writeKey").is_none(), "{ev}");
    assert!(ev["receivedAt"].is_string() && ev["timestamp"].is_string(), "{ev}");
    match ty {
        "identify" => {
            assert_eq!(ev["traits"]["email"], format!("u{i}@example.com"));
            assert!(ev["originalTimestamp"].as_str().unwrap().starts_with("2024-05-01T12:00:00.123"), "{ev}");
        }
        "track" => {
            assert_eq!(ev["event"], "Order Completed");
            assert_eq!(ev["properties"]["total"], i as f64 + 0.5);
            assert_eq!(ev["properties"]["items"], serde_json::json!([1, 2]));
        }
        "page" => assert_eq!(ev["name"], "Install"),
        "screen" => assert_eq!(ev["name"], "Home"),
        "group" => {
            assert_eq!(ev["groupId"], format!("group-{i}"));
            assert_eq!(ev["traits"]["seats"], 10);
        }
        "alias" => assert_eq!(ev["previousId"], format!("anon-{i}")),
        other => panic!("unexpected type {other}"),
    }
}

// ---------------------------------------------------------------------------
// Delivery (route + Centrifuge) helpers: a webhook sink in the test process,
// the `sluice jobs`/`sluice replay` tools, and read-only views of the JobDBs.

/// The `[[destinations]]` "hook" (at `url`, private network allowed, plus
/// `extra` keys) connected to source "web", as TOML for [`write_config`].
pub fn hook_toml(url: &str, extra: &str) -> String {
    format!(
        r#"
[[destinations]]
id = "hook"
url = "{url}"
allow_private_network = true
{extra}

[[connections]]
source = "{SOURCE_ID}"
destinations = ["hook"]
"#
    )
}

/// A [`sluice_deliver::sink::Sink`] with the multi-thread runtime it runs on
/// (the test thread drives it and the HTTP client with [`TestSink::block_on`]).
pub struct TestSink {
    // Declared first: dropped (its task aborted) before the runtime.
    pub sink: sluice_deliver::sink::Sink,
    pub rt: tokio::runtime::Runtime,
    pub http: reqwest::Client,
}

impl TestSink {
    pub fn start() -> TestSink {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let sink = rt.block_on(sluice_deliver::sink::Sink::start()).expect("start the sink");
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("http client");
        TestSink { sink, rt, http }
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Requests received on `path`, grouped by their `Idempotency-Key`.
    pub fn by_key(&self, path: &str) -> HashMap<String, Vec<sluice_deliver::sink::Received>> {
        let mut out: HashMap<String, Vec<_>> = HashMap::new();
        for r in self.sink.received_on(path) {
            let key = r.header("idempotency-key").unwrap_or("<none>").to_owned();
            out.entry(key).or_default().push(r);
        }
        out
    }

    /// Requests received on `path`, grouped by the body's `messageId` (a
    /// replay's copy has its own Idempotency-Key, the same messageId).
    pub fn by_message_id(&self, path: &str) -> HashMap<String, Vec<sluice_deliver::sink::Received>> {
        let mut out: HashMap<String, Vec<_>> = HashMap::new();
        for r in self.sink.received_on(path) {
            let id = r.json()["messageId"].as_str().unwrap_or("<none>").to_owned();
            out.entry(id).or_default().push(r);
        }
        out
    }

    /// POST one batch to the Tracking API: `Ok` on 200; `Err` when the
    /// server is gone or answers 5xx (a client would send it again); panics
    /// on any other status.
    pub fn post_batch(&self, server_addr: &str, events: &[Value]) -> Result<(), String> {
        let url = format!("http://{server_addr}/v1/batch");
        let body = serde_json::json!({ "batch": events });
        let resp = self.block_on(async { self.http.post(&url).basic_auth(WRITE_KEY, Some("")).json(&body).send().await });
        match resp {
            Ok(r) if r.status() == 200 => Ok(()),
            Ok(r) if r.status().is_server_error() => Err(format!("status {}", r.status())),
            Ok(r) => panic!("unexpected status {} for a valid batch", r.status()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// A plain track event with `id` as its messageId.
pub fn track_event(id: &str, i: usize) -> Value {
    serde_json::json!({
        "type": "track",
        "userId": format!("user-{i}"),
        "event": "Deliver Test",
        "messageId": id,
        "properties": {"i": i, "tag": "deliver"},
    })
}

/// Run the `sluice` binary with `args` to completion.
pub fn sluice_cmd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .env_remove("SLUICE_CRASH_AT")
        .env_remove("SLUICE_CONFIG")
        .stdin(Stdio::null())
        .output()
        .expect("run sluice")
}

/// `sluice jobs stats --json` (tried again a few times: a JobDB may be
/// deleted while it is read).
pub fn jobs_stats(config: &Path) -> Value {
    let mut last = String::new();
    for _ in 0..10 {
        let out = sluice_cmd(&["jobs", "stats", "--config", config.to_str().unwrap(), "--json"]);
        if out.status.success() {
            return serde_json::from_slice(&out.stdout).expect("jobs stats --json prints JSON");
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("sluice jobs stats failed: {last}");
}

/// A destination's job counts by state from a `jobs stats --json` answer.
pub fn stats_for(stats: &Value, destination: &str) -> std::collections::BTreeMap<String, u64> {
    stats["destinations"][destination]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_u64().expect("count"))).collect())
        .unwrap_or_default()
}

/// Jobs not in a terminal state (awaiting_scheduling, executing, awaiting_retry), all destinations.
pub fn unfinished_in(stats: &Value) -> u64 {
    let mut n = 0;
    if let Some(dests) = stats["destinations"].as_object() {
        for counts in dests.values() {
            for s in ["awaiting_scheduling", "executing", "awaiting_retry"] {
                n += counts[s].as_u64().unwrap_or(0);
            }
        }
    }
    n
}

/// `sluice config check` of a config file holding `toml`, written in
/// `dir`: whether it passed, and its stderr.
pub fn config_check(dir: &Path, toml: &str) -> (bool, String) {
    let path = dir.join("check.toml");
    std::fs::write(&path, toml).expect("write the config");
    let out = sluice_cmd(&["config", "check", "--config", path.to_str().unwrap()]);
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `sluice jobs inspect KEY --json`: the parsed array, or the CLI's stderr.
pub fn jobs_inspect_json(config: &Path, key: &str) -> Result<Value, String> {
    let out = sluice_cmd(&["jobs", "inspect", key, "--config", config.to_str().unwrap(), "--json"]);
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("jobs inspect --json prints JSON"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Poll `f` every 100 ms until it returns `Some`, or panic with `what()` at the deadline.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>, what: impl Fn() -> String) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?}: {}", what());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Wait until destination `destination`'s job counts (`jobs stats`) meet
/// `done`; the counts then.
pub fn wait_counts(
    config: &Path,
    destination: &str,
    timeout: Duration,
    done: impl Fn(&std::collections::BTreeMap<String, u64>) -> bool,
) -> std::collections::BTreeMap<String, u64> {
    wait_for(
        timeout,
        || {
            let c = stats_for(&jobs_stats(config), destination);
            done(&c).then_some(c)
        },
        || format!("{destination}: {:?}", stats_for(&jobs_stats(config), destination)),
    )
}

/// Commit point 4 for a destination type: start the server of `config`
/// (written by [`write_config`], its data in `<dir>/data`) with `env` and
/// the crash point `deliver.after_http_success:4`, post 200 track events
/// (`c-0` … `c-199`) in batches of 25 until it dies; the messageIds whose
/// jobs were `executing` at the crash.
pub fn crash_after_delivery(sink: &TestSink, config: &Path, env: &[(&str, &str)]) -> std::collections::HashSet<String> {
    let mut env = env.to_vec();
    env.push(("SLUICE_CRASH_AT", "deliver.after_http_success:4"));
    let mut server = Server::start_with_env(config, &env);
    let events: Vec<Value> = (0..200).map(|i| track_event(&format!("c-{i}"), i)).collect();
    for chunk in events.chunks(25) {
        // The server may die while this is sent: what it acknowledged is what counts.
        if sink.post_batch(&server.addr, chunk).is_err() {
            break;
        }
    }
    assert!(server.wait_exit(Duration::from_secs(60)).is_some(), "the crash point stopped the server");
    let data = config.parent().expect("the config's directory").join("data");
    jobdb_rows(&data).into_iter().filter(|r| r.state == "executing").map(|r| r.message_id).collect()
}

/// One job as stored in a JobDB, with its latest state, read with plain SQL.
#[derive(Debug, Clone)]
pub struct JobRow {
    pub jobdb: PathBuf,
    pub message_id: String,
    pub destination: String,
    pub generation: i64,
    pub state: String,
}

/// Every job in every JobDB under `data_dir/jobs`, read-only (works beside
/// a running server, or after it died).
pub fn jobdb_rows(data_dir: &Path) -> Vec<JobRow> {
    let mut out = Vec::new();
    let dir = data_dir.join("jobs");
    let Ok(entries) = std::fs::read_dir(&dir) else { return out };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("jobdb-") && n.ends_with(".sqlite")))
        .collect();
    paths.sort();
    for path in paths {
        let conn = match rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY) {
            Ok(c) => c,
            Err(_) => continue, // deleted meanwhile (every job finished)
        };
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        let mut stmt = match conn.prepare(
            "SELECT j.message_id, j.destination, j.generation,
                    coalesce((SELECT state FROM job_state_transitions t WHERE t.job_id = j.id ORDER BY seq DESC LIMIT 1),
                             'awaiting_scheduling')
             FROM jobs j",
        ) {
            Ok(s) => s,
            Err(rusqlite::Error::SqliteFailure(_, Some(m))) if m.contains("no such table") => continue,
            Err(e) => panic!("reading {}: {e}", path.display()),
        };
        let rows = stmt
            .query_map([], |r| {
                Ok(JobRow { jobdb: path.clone(), message_id: r.get(0)?, destination: r.get(1)?, generation: r.get(2)?, state: r.get(3)? })
            })
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        for row in rows {
            out.push(row.unwrap_or_else(|e| panic!("reading {}: {e}", path.display())));
        }
    }
    out
}

/// Set `destination_qos.paused` of `destination` in `data_dir/control.sqlite`
/// with the README's statement; returns the rows changed.
pub fn set_paused(data_dir: &Path, destination: &str, paused: bool) -> usize {
    let conn = rusqlite::Connection::open(data_dir.join("control.sqlite")).expect("open control.sqlite");
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn.execute("UPDATE destination_qos SET paused = ?1 WHERE destination = ?2", rusqlite::params![paused as i64, destination])
        .expect("update destination_qos")
}

/// Store `plan` as `source`'s tracking plan in the control database (as the admin API would; a running process sees it at its next refresh).
pub fn set_tracking_plan(data_dir: &Path, source: &str, plan: &Value) {
    let conn = rusqlite::Connection::open(data_dir.join("control.sqlite")).expect("open control.sqlite");
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn.execute(
        "INSERT INTO tracking_plans (source, plan, version, updated_at) VALUES (?1, ?2, 1, 0) \
         ON CONFLICT (source) DO UPDATE SET plan = excluded.plan, version = tracking_plans.version + 1",
        rusqlite::params![source, plan.to_string()],
    )
    .expect("store the tracking plan");
}

/// Deploy `code` as function `id`'s next version, made live, in the control database (as the admin API would).
pub fn set_function(data_dir: &Path, id: &str, code: &str) {
    let conn = rusqlite::Connection::open(data_dir.join("control.sqlite")).expect("open control.sqlite");
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    let version: i64 = conn.query_row("SELECT COALESCE(MAX(version), 0) + 1 FROM functions WHERE id = ?1", [id], |r| r.get(0)).unwrap();
    conn.execute("INSERT INTO functions (id, version, code, created_at) VALUES (?1, ?2, ?3, 0)", rusqlite::params![id, version, code]).unwrap();
    conn.execute(
        "INSERT INTO function_live (id, version, updated_at) VALUES (?1, ?2, 0) ON CONFLICT (id) DO UPDATE SET version = excluded.version",
        rusqlite::params![id, version],
    )
    .unwrap();
    conn.execute_batch("COMMIT").unwrap();
}

/// Per partition of `output`: (the `route` group's committed offset, the end).
pub fn route_lag(data_dir: &Path) -> Vec<(Option<u64>, u64)> {
    let log = EmbeddedLog::open_read_only(&data_dir.join("log")).expect("open log read-only");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let partitions = sluice_log::Log::partitions(&log, "output").expect("output topic");
    (0..partitions)
        .map(|p| {
            let range = log.offsets_blocking("output", p).expect("offsets");
            let committed = rt.block_on(sluice_log::Log::committed(&log, sluice_route::GROUP, "output", p)).expect("committed offset");
            (committed, range.end)
        })
        .collect()
}

/// Whether the route has committed every `output` record on every partition.
pub fn route_drained(data_dir: &Path) -> bool {
    route_lag(data_dir).iter().all(|(c, end)| c.unwrap_or(0) >= *end)
}

impl Server {
    /// SIGTERM and wait up to `timeout` for a clean exit; panics (after a
    /// SIGKILL) if the process is still running at the deadline or exits
    /// unsuccessfully, so a shutdown that hangs fails the test instead of
    /// hanging it.
    pub fn stop_within(mut self, timeout: Duration) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
        match self.wait_exit(timeout) {
            Some(status) => assert!(status.success(), "sluice exited with {status}; stderr:\n{}", self.stderr_tail(40)),
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("sluice did not exit within {timeout:?} of SIGTERM; stderr:\n{}", self.stderr_tail(40));
            }
        }
    }
}

/// SplitMix64: a tiny seeded generator for randomized tests (the seed is printed).
pub struct Rng(pub u64);

impl Rng {
    pub fn from_clock() -> Rng {
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
        eprintln!("random seed {seed}");
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0); the modulo bias is irrelevant here.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}

/// A single-node Apache Kafka broker (KRaft) of a test's own, started with
/// `scripts/kafka.sh` on free ports and stopped on drop. `None` (with a
/// message) when Kafka cannot start, unless `SLUICE_REQUIRE_KAFKA=1`, when
/// that fails the test.
pub struct Broker {
    pub dir: PathBuf,
    name: String,
    port: u16,
    cport: u16,
    pub bootstrap: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Broker {
    pub fn start(dir: &Path, name: &str) -> Option<Broker> {
        let (port, cport) = (free_port(), free_port());
        let mut b = Broker { dir: dir.to_owned(), name: name.to_owned(), port, cport, bootstrap: String::new() };
        match b.restart() {
            Ok(()) => Some(b),
            Err(e) if std::env::var("SLUICE_REQUIRE_KAFKA").as_deref() == Ok("1") => panic!("cannot start a Kafka broker: {e}"),
            Err(e) => {
                eprintln!("skipped: cannot start a Kafka broker ({e}); scripts/test.sh fetches Kafka and runs this test");
                None
            }
        }
    }

    /// Start (again, on the same data and ports).
    pub fn restart(&mut self) -> Result<(), String> {
        let out = Command::new("bash")
            .arg(repo_root().join("scripts/kafka.sh"))
            .args(["start", &self.name, &self.port.to_string(), &self.cport.to_string()])
            .arg(&self.dir)
            .output()
            .map_err(|e| e.to_string())?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        match stdout.lines().find_map(|l| l.strip_prefix("KAFKA_BOOTSTRAP=")) {
            Some(b) if out.status.success() => {
                self.bootstrap = b.trim().to_owned();
                Ok(())
            }
            _ => Err(format!("{}\n{}", stdout, String::from_utf8_lossy(&out.stderr))),
        }
    }

    pub fn stop(&self) {
        let _ = Command::new("bash").arg(repo_root().join("scripts/kafka.sh")).arg("stop").arg(&self.dir).output();
    }

    /// The broker's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.dir.join("kafka.pid")).ok()?.trim().parse().ok()?;
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }

    /// SIGKILL the broker (no clean shutdown: its logs are recovered on the
    /// next start) and wait until it is gone.
    pub fn kill9(&self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            // Gone once reaped, or a zombie with no thread left (PID 1 here
            // may never reap it): a zombie leader may still have threads
            // holding the listening socket.
            let gone = || {
                let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z "));
                let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count());
                zombie && threads <= 1
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            while !gone() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = std::fs::remove_file(self.dir.join("kafka.pid"));
    }

    /// Config TOML for `[log.kafka]` pointing at this broker.
    pub fn config_toml(&self) -> String {
        format!(
            "\n[log.kafka]\nrequest_timeout = \"5s\"\nproduce_timeout = \"5s\"\n[log.kafka.primary]\nbootstrap_servers = \"{}\"\n",
            self.bootstrap
        )
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One role process's config (`sluice ingest|dedup|route|director`): its
/// own data_dir in `root/name`, the shared broker and database, a webhook
/// to `sink_url`, and director `director` with `director_extra` (TOML lines
/// of its `[director]` table, e.g. TLS keys).
pub fn role_config(root: &Path, name: &str, broker: &Broker, db_url: &str, sink_url: &str, director: &str, director_extra: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let extra = format!(
        "{}\n[deliver]\njobdb_url = \"{db_url}\"\n[director]\nname = \"{director}\"\nrpc_listen = \"127.0.0.1:0\"\n{director_extra}",
        hook_destination_toml(sink_url)
    );
    write_kafka_config(&dir, broker, &extra)
}

/// The `director.rpc_secret` of configs from [`write_kafka_config`].
pub const RPC_SECRET: &str = "test-rpc-secret-0123456789abcdef0123456789";

/// `write_config`, with `log.backend = "kafka"` and `director.rpc_secret =`
/// [`RPC_SECRET`] (separate route and director processes need it).
pub fn write_kafka_config(dir: &Path, broker: &Broker, extra: &str) -> PathBuf {
    let config = write_config(dir, &format!("{extra}{}", broker.config_toml()));
    let mut text = std::fs::read_to_string(&config).unwrap().replace("[log]\n", "[log]\nbackend = \"kafka\"\n");
    let secret = format!("rpc_secret = \"{RPC_SECRET}\"\n");
    if text.contains("\n[director]\n") {
        text = text.replacen("\n[director]\n", &format!("\n[director]\n{secret}"), 1);
    } else {
        text.push_str(&format!("\n[director]\n{secret}"));
    }
    std::fs::write(&config, text).unwrap();
    config
}

/// A database of its own for one test on the MariaDB (`mysql`) or PostgreSQL
/// (`postgres`) server that `scripts/test.sh` started (`SLUICE_TEST_MYSQL_URL`,
/// `SLUICE_TEST_POSTGRES_URL`); its URL. `None` (with a message) without the
/// server, unless `SLUICE_REQUIRE_SQL=1`, when that fails the test.
pub fn fresh_database(engine: &str, test: &str) -> Option<String> {
    let var = if engine == "mysql" { "SLUICE_TEST_MYSQL_URL" } else { "SLUICE_TEST_POSTGRES_URL" };
    let server = match std::env::var(var) {
        Ok(u) if !u.is_empty() => u,
        _ if std::env::var("SLUICE_REQUIRE_SQL").as_deref() == Ok("1") => panic!("{var} is not set and SLUICE_REQUIRE_SQL=1"),
        _ => {
            eprintln!("skipped: {var} is not set (scripts/sql.sh starts a server)");
            return None;
        }
    };
    Some(create_database(engine, &server, test))
}

/// Create (afresh) a database for test `test` on the MariaDB (`mysql`) or
/// PostgreSQL server at `server`; its URL (the server's, with its path).
pub fn create_database(engine: &str, server: &str, test: &str) -> String {
    use sqlx::Connection;
    let name = format!("sluice_{test}_{}", std::process::id());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        if engine == "mysql" {
            let mut c = sqlx::MySqlConnection::connect(server).await.unwrap_or_else(|e| panic!("connect to {server}: {e}"));
            sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name}")).execute(&mut c).await.unwrap();
            sqlx::raw_sql(&format!("CREATE DATABASE {name}")).execute(&mut c).await.unwrap();
        } else {
            let mut c = sqlx::PgConnection::connect(server).await.unwrap_or_else(|e| panic!("connect to {server}: {e}"));
            sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut c).await.unwrap();
            sqlx::raw_sql(&format!("CREATE DATABASE {name}")).execute(&mut c).await.unwrap();
        }
    });
    let mut url = url::Url::parse(server).unwrap();
    url.set_path(&format!("/{name}"));
    url.to_string()
}

/// Run one of the tests/compat/*_e2e scripts; the unique events it sent.
pub fn run_e2e_script(kind: &str, server: &Server, run_id: &str, count: usize, resend_every: usize) -> Vec<Value> {
    let env = sdk_env();
    let root = repo_root();
    let mut cmd = match kind {
        "python" => {
            let mut c = Command::new(&env["SLUICE_PYTHON"]);
            c.arg(root.join("tests/compat/python_e2e.py"));
            c
        }
        "node" => {
            let mut c = Command::new("node");
            c.arg(root.join("tests/compat/node_e2e.mjs")).env("SLUICE_NODE_MODULES", &env["SLUICE_NODE_MODULES"]);
            c
        }
        _ => unreachable!(),
    };
    cmd.args([&format!("http://{}", server.addr), WRITE_KEY, run_id, &count.to_string(), &resend_every.to_string()]);
    let out = cmd.output().expect("run the SDK script");
    assert!(out.status.success(), "{kind} SDK run failed: {}\nserver stderr:\n{}", String::from_utf8_lossy(&out.stderr), server.stderr_tail(40));
    eprintln!("{kind}: {}", String::from_utf8_lossy(&out.stderr).trim());
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).expect("script output")).collect()
}

/// Send `head` (a request's head, maybe with part of a body) on a raw
/// connection to `addr` and read the answer's status line, waiting at most
/// `wait` (for answers given before a body is sent, or instead of one).
pub fn raw_status_line(addr: &str, head: &str, wait: Duration) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(wait)).unwrap();
    s.write_all(head.as_bytes()).map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(2).any(|w| w == b"\r\n") {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("no answer within {wait:?} ({e}); got {:?}", String::from_utf8_lossy(&got))),
        }
    }
    Ok(String::from_utf8_lossy(&got).lines().next().unwrap_or("").to_owned())
}

/// The browser tools, installed by scripts/setup-browser.sh when the environment does not name them.
/// The modules must hold analytics.js too (the browser SDK test loads it).
pub fn browser_env() -> (String, String) {
    if let (Ok(c), Ok(m)) = (std::env::var("SLUICE_CHROMIUM"), std::env::var("SLUICE_BROWSER_MODULES")) {
        if Path::new(&m).join("@segment/analytics-next/package.json").exists() {
            return (c, m);
        }
    }
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/setup-browser.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/setup-browser.sh");
    assert!(out.status.success(), "scripts/setup-browser.sh failed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let get = |k: &str| text.lines().find_map(|l| l.strip_prefix(&format!("{k}="))).unwrap_or_else(|| panic!("{k} not printed")).to_owned();
    (get("SLUICE_CHROMIUM"), get("SLUICE_BROWSER_MODULES"))
}

pub fn screenshot_dir() -> PathBuf {
    // tests run from target/release/deps: keep the artifacts beside the build.
    let exe = std::env::current_exe().unwrap();
    let target = exe.ancestors().nth(3).unwrap().to_owned();
    let dir = target.join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// The admin API, as the tracking-plan and function tests use it.

pub const TOKEN: &str = "test-admin-token-0123456789";

/// The admin API and the Tracking API of a test server, with [`TOKEN`].
pub struct Api {
    pub http: reqwest::blocking::Client,
    pub admin: String,
    pub api: String,
}

impl Api {
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.http.request(method.parse().unwrap(), format!("http://{}{path}", self.admin)).bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().unwrap();
        let status = resp.status().as_u16();
        (status, serde_json::from_str(&resp.text().unwrap()).unwrap_or(Value::Null))
    }

    pub fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.call(method, path, body);
        assert!((200..300).contains(&status), "{method} {path}: {status} {v}");
        v
    }

    /// Send events (each `(messageId, event name, properties)`) as one batch; acknowledged.
    pub fn send(&self, events: &[(&str, &str, Value)]) {
        let batch: Vec<Value> = events
            .iter()
            .map(|(id, name, props)| serde_json::json!({"type": "track", "messageId": id, "userId": "u1", "event": name, "properties": props}))
            .collect();
        self.send_raw(&batch);
    }

    /// Send these events as one batch; acknowledged.
    pub fn send_raw(&self, batch: &[Value]) {
        let resp = self
            .http
            .post(format!("http://{}/v1/batch", self.api))
            .basic_auth(WRITE_KEY, Some(""))
            .json(&serde_json::json!({"batch": batch}))
            .send()
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
    }

    pub fn metrics(&self) -> String {
        self.http.get(format!("http://{}/metrics", self.admin)).send().unwrap().text().unwrap()
    }
}

/// The body `path` received for messageId `id`, once it has (20 s at most).
pub fn delivered(sink: &TestSink, path: &str, id: &str) -> Value {
    wait_for(
        Duration::from_secs(20),
        || sink.by_message_id(path).get(id).and_then(|r| r.first()).map(|r| serde_json::from_slice::<Value>(&r.body).unwrap()),
        || format!("{id} at {path}"),
    )
}

pub fn never_delivered(sink: &TestSink, path: &str, id: &str) -> bool {
    !sink.by_message_id(path).contains_key(id)
}
