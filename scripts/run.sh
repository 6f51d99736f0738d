#!/usr/bin/env bash
# Run Sluice with the embedded defaults: `scripts/run.sh [serve flags]`.
# Without --config the sample config/sluice.toml is used.
source "$(dirname "$0")/common.sh"
ensure_build_deps
cd "$ROOT"
cargo build --release -p sluice --quiet
exec "$CARGO_TARGET_DIR/release/sluice" serve "$@"
