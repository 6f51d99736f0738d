//! Harness for tests that run the real `sluice` binary (ripgrep's
//! `tests/util.rs` style): start it on free ports, wait until it is ready,
//! kill it (gracefully or with SIGKILL), and read its log back.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// A running `sluice serve`.
pub struct Server {
    child: Child,
    pub addr: String,
    pub admin: String,
    pub config: PathBuf,
    pub stderr: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Start the binary with `config` and wait for its ready line.
    pub fn start(config: &Path) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["--log-format", "json", "serve", "--config"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sluice");
        let stderr = child.stderr.take().expect("stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let sink = lines.clone();
        std::thread::spawn(move || {
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
            Ok((addr, admin)) => Server { child, addr, admin, config: config.to_owned(), stderr: lines },
            Err(_) => {
                let _ = child.kill();
                panic!("sluice did not become ready; stderr:\n{}", lines.lock().unwrap().join("\n"));
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
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

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
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
    let log = EmbeddedLog::open_read_only(&data_dir.join("log")).expect("open log read-only");
    let mut out = Vec::new();
    let partitions = sluice_log::Log::partitions(&log, "input").expect("input topic");
    for p in 0..partitions {
        let range = log.offsets_blocking("input", p).expect("offsets");
        let mut next = range.start;
        loop {
            let batch = log.read_blocking("input", p, next, 10_000).expect("read");
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
