//! The official Python SDK made to send every batch twice (a lost response,
//! then the SDK's retry: same messageIds), against `sluice serve`: `input`
//! holds each message twice, `output` once, with its fields intact.

mod util;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use util::*;

#[test]
fn python_sdk_resending_every_batch_leaves_each_message_once_in_output() {
    let env = sdk_env();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = write_config(dir.path(), "");
    let server = Server::start(&config);

    let count = 20;
    let out = Command::new(&env["SLUICE_PYTHON"])
        .arg(repo_root().join("tests/compat/python_resend.py"))
        .args([&format!("http://{}", server.addr), WRITE_KEY, "r1", &count.to_string()])
        .output()
        .expect("run tests/compat/python_resend.py");
    assert!(out.status.success(), "python SDK run failed: {}\nserver stderr:\n{}", String::from_utf8_lossy(&out.stderr), server.stderr_tail(30));
    eprintln!("python_resend.py: {}", String::from_utf8_lossy(&out.stderr).trim());
    let sent: Vec<Value> = String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).expect("script output")).collect();
    assert_eq!(sent.len(), count * 6, "the script reports every event it sent");

    if let Err(e) = try_wait_for_dedup_drained(&data, Duration::from_secs(60)) {
        panic!("{e}\nserver stderr:\n{}", server.stderr_tail(30));
    }
    server.stop();

    // input: every message twice (the SDK really resent).
    let input = read_input(&data);
    let mut in_input: HashMap<String, Vec<&Stored>> = HashMap::new();
    for s in &input {
        in_input.entry(s.event["messageId"].as_str().expect("messageId").to_owned()).or_default().push(s);
    }
    assert_eq!(input.len(), sent.len() * 2, "input holds each event twice, nothing else");
    for s in &sent {
        let id = s["messageId"].as_str().unwrap();
        assert_eq!(in_input.get(id).map(Vec::len), Some(2), "{id} in input");
    }

    // output: every message once, the first copy received, fields intact.
    let output = read_topic(&data, "output");
    assert_eq!(output.len(), sent.len(), "output holds each event once, nothing else");
    let by_id = by_message_id(&output); // panics on a messageId seen twice
    let mut types = HashMap::new();
    for s in &sent {
        let id = s["messageId"].as_str().unwrap();
        let st = by_id.get(id).unwrap_or_else(|| panic!("{id} missing from output"));
        assert_eq!(st.event, in_input[id][0].event, "output holds the first copy of {id} as ingested");
        check_sdk_event(st, s, "analytics-python");
        let ev = &st.event;
        let ty = s["type"].as_str().unwrap();
        *types.entry(ty.to_owned()).or_insert(0) += 1;
        match ty {
            "identify" => assert_eq!(ev["traits"]["plan"], "pro"),
            "track" => assert_eq!(ev["context"]["ip"], "10.0.0.1"),
            "page" => assert_eq!(ev["properties"]["path"], "/install"),
            "screen" => assert_eq!(ev["properties"]["tab"], 3),
            _ => {}
        }
    }
    assert_eq!(types.len(), 6, "all six call types were exercised: {types:?}");
}
