//! The binary's command line: config errors at start, the sample config by
//! default, environment overrides, `sluice log tail` and `sluice function test`.

mod util;

use std::process::Command;

use util::*;

fn sluice() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
}

#[test]
fn invalid_config_fails_at_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[server]\nlisten = \"not-an-address\"\n", "server.listen"),
        ("[log]\npartitions = 0\n", "log.partitions"),
        ("[[sources]]\nid = \"a\"\nwrite_key = \"k\"\n[[sources]]\nid = \"b\"\nwrite_key = \"k\"\n", "sources[1].write_key"),
        ("[server]\nlissten = \"127.0.0.1:1\"\n", "lissten"),
        ("[log]\nretention = \"forever\"\n", "retention"),
        ("this is not toml", "invalid config"),
    ];
    for (text, key) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let out = sluice().args(["serve", "--config"]).arg(&path).output().unwrap();
        assert!(!out.status.success(), "started with {text:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "error for {text:?} does not name {key:?}: {err}");
    }
    let out = sluice().args(["serve", "--config", "/nonexistent/sluice.toml"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/sluice.toml"));
}

#[test]
fn the_sample_config_is_used_without_config() {
    let out = sluice().args(["config", "check"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("2 source(s)") && text.contains("127.0.0.1:8088"), "{text}");
}

#[test]
fn environment_overrides_the_file_and_flags_override_both() {
    let out = sluice().args(["config", "check"]).env("SLUICE_SERVER__LISTEN", "127.0.0.1:9999").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("127.0.0.1:9999"));
    let out = sluice().args(["config", "check"]).env("SLUICE_SERVER__LISTEN", "nope").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.listen"));

    // A flag beats the environment: the server listens where --listen says.
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let mut child = sluice()
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&config)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", ""])
        .env("SLUICE_SERVER__LISTEN", "256.0.0.1:1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let ready = std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok).find(|l| l.contains("Sluice is ready"));
    child.kill().unwrap();
    child.wait().unwrap();
    let ready = ready.expect("server started despite a bad SLUICE_SERVER__LISTEN, because --listen overrides it");
    assert!(ready.contains("\"admin\":\"off\""), "{ready}");
}

#[test]
fn log_tail_prints_one_event_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let server = Server::start(&config);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let batch: Vec<_> = (0..40)
        .map(|i| {
            serde_json::json!({"type":"track","userId":"u","event":"E","messageId":format!("m-{i}"),
            "properties":{"pretty":"\n"}})
        })
        .collect();
    let status = rt.block_on(async {
        reqwest::Client::new()
            .post(server.url("/v1/batch"))
            .basic_auth(WRITE_KEY, Some(""))
            // Pretty-printed on purpose: tail must still print one event per line.
            .body(serde_json::to_string_pretty(&serde_json::json!({ "batch": batch })).unwrap())
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status, 200);
    let data = dir.path().join("data");
    let tail = |args: &[&str]| {
        let out = sluice().args(["log", "tail", "--data-dir"]).arg(&data).args(args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    // Works while the server runs (read-only view) and after it stops.
    let live = tail(&["--topic", "input"]);
    server.stop();
    let all = tail(&["--topic", "input"]);
    assert_eq!(live, all);
    let lines: Vec<serde_json::Value> = all.lines().map(|l| serde_json::from_str(l).expect("a JSON event per line")).collect();
    assert_eq!(lines.len(), 40);
    let mut ids: Vec<String> = lines.iter().map(|e| e["messageId"].as_str().unwrap().to_owned()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 40);

    // One partition, from an offset, with the envelope.
    let p = sluice_core::partition_for("m-7", 4);
    let env = tail(&["--partition", &p.to_string(), "--envelope"]);
    let recs: Vec<serde_json::Value> = env.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(recs.iter().all(|r| r["partition"] == p));
    let m7 = recs.iter().find(|r| r["event"]["messageId"] == "m-7").expect("m-7 in its partition");
    assert_eq!(m7["key"], "web/m-7");
    let from = m7["offset"].as_u64().unwrap();
    let rest = tail(&["--partition", &p.to_string(), "--from", &from.to_string()]);
    assert_eq!(rest.lines().count() as u64, recs.len() as u64 - from);
    assert!(rest.lines().next().unwrap().contains("\"m-7\""));

    let out = sluice().args(["log", "tail", "--data-dir"]).arg(&data).args(["--partition", "99"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no partition 99"));
    let out = sluice().args(["log", "tail", "--data-dir", "/nonexistent"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no log at"));
}

/// Issue 11 (6): a filter nested 20,000 levels deep passed `config check` and
/// then overflowed the stack of `serve` on the first routed event, on every
/// restart. The parser now refuses nesting past `filter::MAX_DEPTH` (64), and
/// `config check` goes through it.
#[test]
fn config_check_refuses_a_filter_nested_too_deep() {
    let dir = tempfile::tempdir().unwrap();
    let deep = format!("{}type = \\\"track\\\"", "not ".repeat(20_000));
    let extra = format!(
        "[[destinations]]\nid = \"hook\"\nurl = \"http://127.0.0.1:9/\"\nallow_private_network = true\n\
         [[destinations.filters]]\nif = \"{deep}\"\naction = \"drop\"\n\
         [[connections]]\nsource = \"{SOURCE_ID}\"\ndestinations = [\"hook\"]\n"
    );
    let config = write_config(dir.path(), &extra);
    let out = sluice().args(["config", "check", "--config"]).arg(&config).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "config check accepted a filter nested 20,000 deep: {err}");
    assert!(err.contains("destinations[0].filters[0].if"), "the error does not name the key: {err}");
    assert!(err.contains("more than 64 levels deep"), "the error does not say the filter is too deep: {err}");

    // The same filter 64 levels deep is accepted.
    let ok = extra.replace(&deep, &format!("{}type = \\\"track\\\"", "not ".repeat(64)));
    let config = write_config(dir.path(), &ok);
    let out = sluice().args(["config", "check", "--config"]).arg(&config).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `jobs stats` / `jobs inspect` on a data directory that does not exist
/// say so (they printed "0 JobDB(s)", as for a real but empty one).
#[test]
fn jobs_commands_name_a_missing_data_dir() {
    for args in
        [&["jobs", "stats", "--data-dir", "/nonexistent/sluice-data"][..], &["jobs", "inspect", "--data-dir", "/nonexistent/sluice-data", "m-1"]]
    {
        let out = sluice().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no data directory at /nonexistent/sluice-data"), "{args:?}: {err}");
    }
}

/// `sluice function test`: a function run locally on one event prints what
/// became of it; a thrown error gives its class and exit status 3; an
/// endless loop is cut off by the time budget; a file without a handler is
/// refused.
#[test]
fn function_test_runs_one_function_on_one_event() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let event = file("event.json", r#"{"type":"track","event":"Order Completed","messageId":"m1","properties":{"price":9.5,"sku":"A1"}}"#);
    let run = |code: &str, extra: &[&str]| {
        let f = file("f.js", code);
        let mut args = vec!["function", "test", f.as_str(), "--event", event.as_str()];
        args.extend_from_slice(extra);
        let out = sluice().args(&args).output().unwrap();
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        (out.status.code(), json, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, out, _) = run(
        "async function onTrack(event, settings) { event.properties.amount = event.properties.price; delete event.properties.price; \
         event.properties.by = settings.by; return event; }",
        &["--settings", r#"{"by":"fn"}"#],
    );
    assert_eq!(code, Some(0));
    assert_eq!(out["outcome"], "event");
    assert_eq!(out["event"]["properties"], serde_json::json!({"amount": 9.5, "sku": "A1", "by": "fn"}));
    let (code, out, _) = run("async function onTrack(e) { throw new DropEvent('not this one'); }", &[]);
    assert_eq!((code, out["outcome"].as_str(), out["reason"].as_str()), (Some(0), Some("dropped"), Some("not this one")));
    let (code, out, _) = run("async function onTrack(e) { throw new RetryError('rate limited'); }", &[]);
    assert_eq!((code, out["class"].as_str(), out["retried"].as_bool()), (Some(3), Some("RetryError"), Some(true)));
    let (code, out, _) = run("async function onTrack(e) { for (;;) {} }", &["--timeout-ms", "50"]);
    assert_eq!((code, out["class"].as_str()), (Some(3), Some("Timeout")), "{out}");
    let (code, _, stderr) = run("const x = 1;", &[]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("no handler"), "{stderr}");
}
