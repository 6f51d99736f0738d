#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need,
# then runs every test of the workspace (unit, spec, property, SDK
# compatibility, crash and headless-browser console tests). Extra arguments go to `cargo test`.
source "$(dirname "$0")/common.sh"
ensure_build_deps
cd "$ROOT"
while IFS='=' read -r key value; do export "$key=$value"; done < <(bash scripts/setup-compat.sh)
while IFS='=' read -r key value; do export "$key=$value"; done < <(bash scripts/setup-browser.sh)
log "building and running the tests (target dir: $CARGO_TARGET_DIR)"
cargo test --release --workspace "$@"
log "OpenTelemetry traces (cargo feature otel)"
cargo test --release -p sluice --features otel --test otel "$@"
