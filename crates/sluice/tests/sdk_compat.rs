//! The official Segment SDKs, unchanged, against the real `sluice` binary:
//! every call type goes through `segment-analytics-python` (plain and gzip),
//! `@segment/analytics-node`, and analytics.js (`@segment/analytics-next`)
//! in headless Chromium on a page of another origin (CORS); then the log is
//! read back and each event's fields and the count are checked.

mod util;

use std::process::Command;

use chrono_free::*;
use serde_json::Value;
use util::*;

/// Tiny RFC 3339 helpers without pulling chrono into the binary's tests.
mod chrono_free {
    /// Milliseconds since the epoch of "YYYY-MM-DDTHH:MM:SS(.fff)Z".
    pub fn utc_ms(s: &str) -> i64 {
        let b = s.as_bytes();
        assert!(s.ends_with('Z') && b[10] == b'T', "not a UTC RFC 3339 time: {s}");
        let n = |a: usize, l: usize| s[a..a + l].parse::<i64>().unwrap();
        let (y, mo, d, h, mi, se) = (n(0, 4), n(5, 2), n(8, 2), n(11, 2), n(14, 2), n(17, 2));
        let ms = if b[19] == b'.' { format!("{:0<3}", &s[20..s.len() - 1])[..3].parse::<i64>().unwrap() } else { 0 };
        // Days from civil (Howard Hinnant's algorithm).
        let y2 = if mo <= 2 { y - 1 } else { y };
        let era = y2.div_euclid(400);
        let yoe = y2 - era * 400;
        let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146097 + doe - 719468;
        ((days * 24 + h) * 60 + mi) * 60_000 + se * 1000 + ms
    }
}

fn run_sdk(kind: &str, server: &Server, run_id: &str, count: usize, gzip: bool) -> Vec<Value> {
    let env = sdk_env();
    let root = repo_root();
    let host = format!("http://{}", server.addr);
    let mut cmd = match kind {
        "python" => {
            let mut c = Command::new(&env["SLUICE_PYTHON"]);
            c.arg(root.join("tests/compat/python_sdk.py"));
            c
        }
        "node" => {
            let mut c = Command::new("node");
            c.arg(root.join("tests/compat/node_sdk.mjs")).env("SLUICE_NODE_MODULES", &env["SLUICE_NODE_MODULES"]);
            c
        }
        _ => unreachable!(),
    };
    cmd.args([host.as_str(), WRITE_KEY, run_id, &count.to_string()]);
    if gzip {
        cmd.arg("--gzip");
    }
    let out = cmd.output().expect("run the SDK script");
    assert!(out.status.success(), "{kind} SDK run failed: {}\nserver stderr:\n{}", String::from_utf8_lossy(&out.stderr), server.stderr_text());
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).expect("SDK script output")).collect()
}

fn check_sdk(kind: &str, gzip: bool, library: &str) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let server = Server::start(&config);
    let run_id = format!("{kind}{}", if gzip { "-gz" } else { "" });
    let count = 20;
    let sent = run_sdk(kind, &server, &run_id, count, gzip);
    assert_eq!(sent.len(), count * 6, "the script reports every event it sent");
    server.stop();

    let stored = read_input(&dir.path().join("data"));
    assert_eq!(stored.len(), sent.len(), "each event stored once, nothing else");
    let by_id = by_message_id(&stored);
    let mut types = std::collections::HashMap::new();
    for s in &sent {
        let id = s["messageId"].as_str().unwrap();
        let st = by_id.get(id).unwrap_or_else(|| panic!("{id} missing from the log"));
        let ev = &st.event;
        let ty = s["type"].as_str().unwrap();
        *types.entry(ty.to_owned()).or_insert(0) += 1;
        check_sdk_event(st, s, library);
        let received = utc_ms(ev["receivedAt"].as_str().expect("receivedAt"));
        let timestamp = utc_ms(ev["timestamp"].as_str().expect("timestamp"));
        match ty {
            // Sent with a 2024 timestamp: skew correction keeps it there
            // (sentAt and receivedAt are both "now"), within clock noise.
            "identify" => {
                let expected = utc_ms("2024-05-01T12:00:00.123Z");
                assert!((timestamp - expected).abs() < 60_000, "skew-corrected timestamp {} far from 2024-05-01T12:00:00.123Z", ev["timestamp"]);
            }
            "track" => assert!((received - timestamp).abs() < 60_000, "timestamp near receivedAt: {ev}"),
            _ => {}
        }
    }
    assert_eq!(types.len(), 6, "all six call types were exercised: {types:?}");
}

#[test]
fn python_sdk_every_call_type() {
    check_sdk("python", false, "analytics-python");
}

#[test]
fn python_sdk_gzip() {
    check_sdk("python", true, "analytics-python");
}

#[test]
fn node_sdk_every_call_type() {
    check_sdk("node", false, "@segment/analytics-node");
}

/// analytics.js in Chromium, from a page on another origin, sends `count`
/// of each call type; the script fails on any failed browser request (CORS
/// included), any answer >= 400 and any event Sluice did not acknowledge.
fn check_browser(batching: bool) {
    let (chromium, modules) = browser_env();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let server = Server::start(&config);
    let run_id = if batching { "batching" } else { "single" };
    let count = 10;
    let mut cmd = Command::new("node");
    cmd.arg(repo_root().join("tests/compat/browser_sdk.mjs"))
        .args([&format!("http://{}", server.addr), WRITE_KEY, run_id, &count.to_string()])
        .env("SLUICE_CHROMIUM", &chromium)
        .env("SLUICE_BROWSER_MODULES", &modules);
    if batching {
        cmd.arg("--batching");
    }
    let out = cmd.output().expect("run node");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "analytics.js in Chromium failed:\n{stderr}\nserver stderr:\n{}", server.stderr_tail(30));
    eprintln!("{stderr}");
    let sent: Vec<Value> = String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).expect("script output")).collect();
    assert_eq!(sent.len(), count * 6, "the script reports every event it sent");
    server.stop();

    let stored = read_input(&dir.path().join("data"));
    assert_eq!(stored.len(), sent.len(), "each event stored once, nothing else");
    let by_id = by_message_id(&stored);
    let mut types = std::collections::HashSet::new();
    for s in &sent {
        let id = s["messageId"].as_str().unwrap();
        let st = by_id.get(id).unwrap_or_else(|| panic!("{id} missing from the log"));
        check_sdk_event(st, s, "analytics.js");
        types.insert(s["type"].as_str().unwrap().to_owned());
        let ev = &st.event;
        assert!(ev["anonymousId"].is_string(), "analytics.js sets anonymousId: {ev}");
        assert!(ev["context"]["userAgent"].as_str().is_some_and(|ua| ua.contains("Chrom")), "sent from Chromium: {ev}");
        assert!(ev["context"]["page"]["url"].as_str().is_some_and(|u| u.starts_with("http://127.0.0.1:")), "page context: {ev}");
    }
    assert_eq!(types.len(), 6, "all six call types were exercised: {types:?}");
}

#[test]
fn analytics_js_in_chromium_every_call_type_cross_origin() {
    check_browser(false);
}

#[test]
fn analytics_js_in_chromium_batching_cross_origin() {
    check_browser(true);
}
