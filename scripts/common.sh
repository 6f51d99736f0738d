# Shared settings for the scripts; sourced, not run.
# Build output and installed test tools live outside the clone so a fresh
# clone (and CI) reuses them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export SLUICE_CACHE="${SLUICE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sluice}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$SLUICE_CACHE/target}"
mkdir -p "$SLUICE_CACHE"

log() { printf '\033[1m[sluice]\033[0m %s\n' "$*" >&2; }

# Install Debian packages that are missing (no-op when all are present).
apt_ensure() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

# The Rust toolchain: rustup's cargo, or a clear message.
ensure_rust() {
  if ! command -v cargo >/dev/null 2>&1; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
  fi
  command -v cargo >/dev/null 2>&1 || { log "cargo not found: install Rust with rustup first"; exit 1; }
}

# What every build needs from Debian: the C toolchain, RocksDB (linked
# dynamically from librocksdb-dev; its bindings are generated with libclang),
# and cmake plus one curl header for librdkafka, which is built from source.
ensure_build_deps() {
  ensure_rust
  apt_ensure build-essential pkg-config clang libclang-dev librocksdb-dev cmake libcurl4-openssl-dev libssl-dev openssl
}

# npm_ensure DIR PACKAGE SPEC: install npm SPEC (e.g. 'playwright-core@1.65.1')
# into DIR/node_modules unless PACKAGE is already there. Idempotent.
npm_ensure() {
  local dir="$1" package="$2" spec="$3"
  command -v node >/dev/null || apt_ensure nodejs npm
  [ -f "$dir/node_modules/$package/package.json" ] && return 0
  log "installing $spec into $dir"
  mkdir -p "$dir"
  (cd "$dir" && { [ -f package.json ] || npm init -y >/dev/null; } && npm install --silent --no-fund --no-audit "$spec" >&2)
}
