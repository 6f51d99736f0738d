//! The web console in headless Chromium (Debian's `chromium`, driven by
//! playwright-core; `scripts/setup-browser.sh` installs both) against a
//! running pipeline: pages load, charts draw live data, pause and resume
//! work end to end, the debugger and inspector show the event, a tracking
//! plan saved from its page shows in the debugger, a function is
//! deployed, tested and rolled back from its page. A screenshot
//! of each page is saved under `<target dir>/console-screenshots/`.

mod util;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_deliver::sink::Sink;
use util::*;

const TOKEN: &str = "console-test-token-0123456789";

#[test]
fn the_console_shows_the_pipeline_and_pauses_a_destination_in_headless_chromium() {
    let (chromium, modules) = browser_env();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sink = rt.block_on(Sink::start()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let extra = hook_destination_toml(&sink.url("/hook"));
    let config = write_config(dir.path(), &extra);
    set_admin_token(&config, TOKEN);
    let server = Server::start(&config);

    // Traffic while the browser watches: a batch every 200 ms, with one repeat.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let (addr, stop) = (server.addr.clone(), stop.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let http = reqwest::Client::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let batch: Vec<Value> =
                    (0..20).map(|k| json!({"type": "track", "userId": "u", "event": "Console Test", "messageId": format!("c-{i}-{k}")})).collect();
                let mut with_repeat = batch.clone();
                with_repeat.push(batch[0].clone());
                // Markup in an event must show as text, never run or render.
                with_repeat
                    .push(json!({"type": "track", "userId": "u", "event": "Console Test", "messageId": format!("xss-<b class=injected>{i}</b>")}));
                let _ = rt.block_on(
                    http.post(format!("http://{addr}/v1/batch")).basic_auth(WRITE_KEY, Some("")).json(&json!({"batch": with_repeat})).send(),
                );
                i += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sink.received_on("/hook").iter().any(|r| r.header("idempotency-key") == Some("c-0-0")) {
        assert!(Instant::now() < deadline, "c-0-0 was not delivered");
        std::thread::sleep(Duration::from_millis(50));
    }

    let shots = screenshot_dir();
    let out = Command::new("node")
        .arg(repo_root().join("tests/console/console_test.mjs"))
        .args([&format!("http://{}", server.admin), TOKEN, "c-0-0", shots.to_str().unwrap()])
        .env("SLUICE_CHROMIUM", &chromium)
        .env("SLUICE_BROWSER_MODULES", &modules)
        .output()
        .expect("run node");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sender.join().unwrap();
    assert!(
        out.status.success(),
        "console test failed:\n{}\n{}\nserver:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        server.stderr_tail(20)
    );
    let r: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    eprintln!("console results: {r}");
    assert!(r["overview_points"].as_u64().unwrap() >= 3, "{r}");
    assert!(r["success_card"].as_str().unwrap().ends_with('%'), "{r}");
    assert_eq!(r["paused_via_api"], true, "the Pause button paused the destination: {r}");
    assert_eq!(r["resumed_via_api"], true, "the Resume button resumed it: {r}");
    assert!(r["success_rate_cell"].as_str().unwrap().contains('%'), "{r}");
    assert!(r["debugger_rows"].as_u64().unwrap() >= 1, "{r}");
    assert_eq!(r["debugger_has_event"], true, "the debugger lists the test's events: {r}");
    assert_eq!(r["debugger_markup_escaped"], true, "event markup is shown as text: {r}");
    let states: Vec<&str> = r["inspector_states"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    assert_eq!(states, vec!["awaiting_scheduling", "executing", "succeeded"], "{r}");
    assert_eq!(r["plan_saved"], true, "a tracking plan saved from the console is stored: {r}");
    assert!(r["debugger_plan_cell"].as_str().unwrap().starts_with("flagged: Unplanned Event"), "{r}");
    assert_eq!(r["function_test"]["event"]["properties"]["v"], 2, "the live version (2) ran on the test event: {r}");
    assert_eq!(r["function_live_after_restore"], 1, "Make live restored version 1: {r}");
    assert_eq!(r["external_requests"], json!([]), "the console loads nothing from outside the admin port");
    for page in ["overview", "destinations", "debugger", "inspector", "plans", "functions"] {
        let png = std::fs::read(shots.join(format!("{page}.png"))).unwrap_or_else(|e| panic!("{page}.png: {e}"));
        assert!(png.len() > 5_000 && png.starts_with(b"\x89PNG"), "{page}.png is a real screenshot");
    }
    server.stop();
}
