//! Configuration loading (`sluice_core::Config::from_toml_with_env`, what
//! `Config::load` and so `sluice config check` run), with environment
//! overrides.
//!
//! Input: environment lines `NAME=VALUE` (one per line), a NUL byte, then
//! the TOML text (no NUL: all of it is TOML). Checked: no panic; a
//! configuration that validates also answers every accessor built from
//! several keys (`archive_target`, `archive_dir`, `output_retention`, ...);
//! every destination's filter parses; sources and
//! destinations survive the JSON round trip the control database makes
//! (seeded from the config, read back on every refresh) unchanged and still
//! valid.

#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use sluice_core::filter::Condition;
use sluice_core::Config;


fuzz_target!(|data: &[u8]| {
    let (env_text, toml) = sluice_fuzz::split(data, 0);
    let (env_text, toml) = if toml.is_empty() && !data.contains(&0) { (&[][..], env_text) } else { (env_text, toml) };
    let env: HashMap<String, String> = String::from_utf8_lossy(env_text)
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect();
    let Ok(text) = std::str::from_utf8(toml) else { return };
    let Ok(config) = Config::from_toml_with_env(text, " (fuzz)", &env) else { return };
    let _ = config.archive_target();
    let _ = config.archive_dir();
    let _ = config.output_retention();
    let global = config.deliver.retry_policy();
    for d in &config.destinations {
        let _ = d.integration_name();
        let _ = d.retry_policy(global);
        for f in &d.filters {
            if let Some(c) = &f.condition {
                Condition::parse(c).unwrap_or_else(|e| panic!("a validated filter does not parse: {c:?}: {e}"));
            }
        }
        // Destinations are stored as JSON (control database, admin API): a
        // validated one survives the trip unchanged and still validates.
        let text = serde_json::to_string(d).expect("a destination serializes");
        let back: sluice_core::config::DestinationConfig =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("a validated destination does not read back ({e}): {text}"));
        assert_eq!(&back, d, "a destination changes through JSON: {text}");
        back.validate("destinations[_]", global).expect("a destination read back still validates");
    }
    for s in &config.sources {
        let text = serde_json::to_string(s).expect("a source serializes");
        let back: sluice_core::config::SourceConfig =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("a validated source does not read back ({e}): {text}"));
        assert_eq!(&back, s, "a source changes through JSON: {text}");
    }
    let _ = format!("{config:?}");
});
