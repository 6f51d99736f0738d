//! Hostile configuration files: each is refused with an error naming the
//! key (or the TOML problem), never a panic, never a config that starts and
//! fails later. Listed in docs/SECURITY.md.

use std::collections::HashMap;

use sluice_core::config::Config;

fn load(text: &str) -> Result<Config, String> {
    // A panic inside would fail the test run; catch it to name the case.
    std::panic::catch_unwind(|| Config::from_toml_with_env(text, " in hostile.toml", &HashMap::new()))
        .map_err(|_| "PANIC".to_owned())?
        .map_err(|e| e.to_string())
}

const DEST: &str = "[[sources]]\nid = \"web\"\nwrite_key = \"wk_web_123\"\n[[destinations]]\nid = \"d\"\nurl = \"https://example.com/hook\"\n";

/// (case name, config text, a part of the error it must get).
fn cases() -> Vec<(&'static str, String, &'static str)> {
    let deep_filter =
        format!("{DEST}[[destinations.filters]]\nif = '{}type = \"track\"{}'\naction = \"drop\"\n", "(".repeat(20_000), ")".repeat(20_000));
    let deep_not = format!("{DEST}[[destinations.filters]]\nif = '{}type = \"track\"'\naction = \"drop\"\n", "not ".repeat(6_000));
    vec![
        ("config-not-toml", "[[[server".into(), "hostile.toml"),
        ("config-deep-toml-arrays", format!("x = {}1{}", "[".repeat(50_000), "]".repeat(50_000)), "hostile.toml"),
        ("config-deep-toml-tables", format!("x = {}1{}", "{a = ".repeat(50_000), "}".repeat(50_000)), "hostile.toml"),
        ("config-10mb-string", format!("[server]\nlisten = \"{}\"\n", "a".repeat(10 << 20)), "server.listen"),
        ("config-unknown-key", "[ingest]\nmax_bytes = 1\n".into(), "max_bytes"),
        ("config-partitions-zero", "[log]\npartitions = 0\n".into(), "log.partitions"),
        ("config-partitions-huge", "[log]\npartitions = 4000000000\n".into(), "log.partitions"),
        ("config-negative-count", "[server]\nmax_connections = -1\n".into(), "max_connections"),
        ("config-request-bytes-huge", "[ingest]\nmax_request_bytes = 4611686018427387904\n".into(), "ingest.max_request_bytes"),
        ("config-event-bytes-over-rpc", "[ingest]\nmax_request_bytes = 67108864\nmax_event_bytes = 33554432\n".into(), "ingest.max_event_bytes"),
        ("config-header-timeout-u64-max", "[server]\nheader_read_timeout = \"18446744073709551615s\"\n".into(), "server.header_read_timeout"),
        ("config-body-timeout-10-years", "[server]\nbody_read_timeout = \"10years\"\n".into(), "server.body_read_timeout"),
        ("config-partitions-4096", "[log]\npartitions = 4096\n".into(), "log.partitions"),
        ("config-destination-port-99999", "[[destinations]]\nid = \"d\"\nurl = \"http://127.0.0.1:99999/hook\"\n".into(), "destinations[0].url"),
        ("config-destination-no-host", "[[destinations]]\nid = \"d\"\nurl = \"https:///hook\"\n".into(), "destinations[0].url"),
        ("config-admin-token-trailing-space", "[admin]\ntoken = \"0123456789abcdef \"\n".into(), "admin.token"),
        ("config-duration-overflow", "[server]\nbody_read_timeout = \"99999999999999999999 years\"\n".into(), "body_read_timeout"),
        ("config-duration-negative", "[server]\nbody_read_timeout = \"-5s\"\n".into(), "body_read_timeout"),
        ("config-listen-port-out-of-range", "[server]\nlisten = \"127.0.0.1:99999\"\n".into(), "server.listen"),
        ("config-data-dir-empty", "[server]\ndata_dir = \"\"\n".into(), "server.data_dir"),
        ("config-admin-token-short", "[admin]\ntoken = \"abc\"\n".into(), "admin.token"),
        ("config-source-id-slash", "[[sources]]\nid = \"a/b\"\nwrite_key = \"k\"\n".into(), "sources[0].id"),
        ("config-source-id-unicode", "[[sources]]\nid = \"wéb\"\nwrite_key = \"k\"\n".into(), "sources[0].id"),
        ("config-write-key-colon", "[[sources]]\nid = \"a\"\nwrite_key = \"k:k\"\n".into(), "sources[0].write_key"),
        (
            "config-duplicate-write-key",
            "[[sources]]\nid = \"a\"\nwrite_key = \"k\"\n[[sources]]\nid = \"b\"\nwrite_key = \"k\"\n".into(),
            "sources[1].write_key",
        ),
        ("config-destination-url-javascript", "[[destinations]]\nid = \"d\"\nurl = \"javascript:alert(1)\"\n".into(), "destinations[0].url"),
        ("config-destination-url-file", "[[destinations]]\nid = \"d\"\nurl = \"file:///etc/passwd\"\n".into(), "destinations[0].url"),
        ("config-destination-id-slash", "[[destinations]]\nid = \"../d\"\nurl = \"https://example.com\"\n".into(), "destinations[0].id"),
        ("config-duplicate-destination", format!("{DEST}[[destinations]]\nid = \"d\"\nurl = \"https://example.com/2\"\n"), "destinations[1].id"),
        ("config-connection-unknown-destination", format!("{DEST}[[connections]]\nsource = \"web\"\ndestinations = [\"nope\"]\n"), "connections[0]"),
        ("config-filter-syntax", format!("{DEST}[[destinations.filters]]\nif = 'type = '\naction = \"drop\"\n"), "destinations[0].filters[0]"),
        ("config-filter-depth-20000", deep_filter, "destinations[0].filters[0]"),
        ("config-filter-not-6000", deep_not, "destinations[0].filters[0]"),
    ]
}

#[test]
fn every_hostile_config_is_refused_with_an_error_naming_the_problem() {
    // A thread with a small stack, as a tokio worker has: deep input must
    // not need a deep stack.
    let failures = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(|| {
            let mut failures = Vec::new();
            for (name, text, needle) in cases() {
                match load(&text) {
                    Ok(_) => failures.push(format!("{name}: accepted")),
                    Err(e) if e == "PANIC" => failures.push(format!("{name}: panicked")),
                    Err(e) if !e.contains(needle) => {
                        failures.push(format!("{name}: error does not name {needle:?}: {}", e.chars().take(300).collect::<String>()))
                    }
                    // An error must stay readable, whatever the file holds.
                    Err(e) if e.len() > 2048 => failures.push(format!("{name}: error is {} bytes long", e.len())),
                    Err(_) => {}
                }
            }
            failures
        })
        .unwrap()
        .join()
        .expect("no stack overflow");
    assert!(failures.is_empty(), "{} case(s) failed:\n{}", failures.len(), failures.join("\n"));
}

/// Hostile environment overrides (`SLUICE_<SECTION>__<KEY>`) over a valid
/// file: (case name, variables, a part of the error it must get). The error
/// names the variable, never the file (which is not at fault).
fn env_cases() -> Vec<(&'static str, Vec<(&'static str, String)>, &'static str)> {
    vec![
        ("config-env-not-a-number", vec![("SLUICE_LOG__PARTITIONS", "lots".into())], "SLUICE_LOG__PARTITIONS"),
        ("config-env-partitions-4096", vec![("SLUICE_LOG__PARTITIONS", "4096".into())], "SLUICE_LOG__PARTITIONS"),
        ("config-env-unknown-key", vec![("SLUICE_LOG__PARTITONS", "3".into())], "SLUICE_LOG__PARTITONS"),
        ("config-env-malformed-name", vec![("SLUICE__X", "1".into())], "SLUICE__X"),
        ("config-env-section-not-a-table", vec![("SLUICE_SOURCES__ID", "x".into())], "SLUICE_SOURCES__ID"),
        ("config-env-10mb-value", vec![("SLUICE_SERVER__LISTEN", "a".repeat(10 << 20))], "SLUICE_SERVER__LISTEN"),
        ("config-env-second-of-two", vec![("SLUICE_LOG__PARTITIONS", "4".into()), ("SLUICE_LOG__RETENTION", "soon".into())], "SLUICE_LOG__RETENTION"),
    ]
}

#[test]
fn every_hostile_env_override_is_refused_naming_the_variable() {
    let mut failures = Vec::new();
    for (name, vars, needle) in env_cases() {
        let env: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        let got = std::panic::catch_unwind(|| Config::from_toml_with_env(DEST, " in hostile.toml", &env)).map_err(|_| "PANIC".to_owned());
        match got.map(|r| r.map_err(|e| e.to_string())) {
            Err(_) => failures.push(format!("{name}: panicked")),
            Ok(Ok(_)) => failures.push(format!("{name}: accepted")),
            Ok(Err(e)) if !e.contains(needle) || e.contains("hostile.toml") || e.len() > 2048 => {
                failures.push(format!("{name}: error does not name {needle:?} alone: {}", e.chars().take(300).collect::<String>()))
            }
            Ok(Err(_)) => {}
        }
    }
    assert!(failures.is_empty(), "{} case(s) failed:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn every_case_is_listed_in_security_md() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/SECURITY.md")).expect("docs/SECURITY.md");
    let missing: Vec<&str> =
        cases().iter().map(|c| c.0).chain(env_cases().iter().map(|c| c.0)).filter(|n| !doc.contains(&format!("`{n}`"))).collect();
    assert!(missing.is_empty(), "cases missing from docs/SECURITY.md: {missing:?}");
}
