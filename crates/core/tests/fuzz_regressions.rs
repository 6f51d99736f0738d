//! Inputs the fuzz targets (`fuzz/`, docs/FUZZING.md) found crashing, kept
//! as regression tests. Each input is also in `fuzz/corpus/<target>/`.

use std::collections::HashMap;

use sluice_core::Config;

/// Fuzz target `config`, `crash-1db02a05…`: an environment variable whose
/// `__` touches the `SLUICE_` prefix (`SLUICE__ENTION`) passed the filter
/// (`contains("__")`) but had no `__` after the prefix, and
/// `apply_env_overrides` panicked (`expect("filtered")`): `sluice config
/// check` and `serve` died on such a variable instead of naming it.
#[test]
fn env_override_with_the_separator_against_the_prefix_is_an_error() {
    // The input as found: environment lines, NUL, (empty) TOML.
    let env: HashMap<String, String> =
        HashMap::from([("SLUI!CE_BERVER".to_string(), "1".to_string()), ("SLUICE__ENTION".to_string(), "[1\u{FFFD}2]".to_string())]);
    let err = Config::from_toml_with_env("", "", &env).expect_err("a malformed override is refused").to_string();
    assert!(err.contains("SLUICE__ENTION"), "the error names the variable: {err}");

    for name in ["SLUICE__", "SLUICE__X", "SLUICE___"] {
        let env = HashMap::from([(name.to_string(), "1".to_string())]);
        let err = Config::from_toml_with_env("", "", &env).expect_err(name).to_string();
        assert!(err.contains(name), "the error names {name}: {err}");
    }
}
