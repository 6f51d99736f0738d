#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz / libFuzzer) of the targets in fuzz/
# (docs/FUZZING.md): each runs for a bounded time, starting from its corpus
# in fuzz/corpus/<target>/. A crash fails the script and names the
# reproducer.
#
#   scripts/fuzz.sh [seconds-per-target] [target...]    default: 60, every target
#
# Environment:
#   SLUICE_FUZZ_MERGE=1     merge the inputs that add edge coverage back into
#                           fuzz/corpus/<target>/ (off by default, so CI never
#                           writes into the repo)
#   SLUICE_FUZZ_SANITIZER   none (default) or address
# scripts/test.sh runs it with SLUICE_FUZZ_SECONDS (default 60; 0 skips).
#
# Stable Rust: cargo-fuzz's -Z flags are allowed with RUSTC_BOOTSTRAP=1. The
# fuzz build has its own RUSTFLAGS, so it has its own target directory
# ($SLUICE_CACHE/fuzz-target) and never invalidates the main build.
# Release with debug assertions (-O -a): fast, and integer overflows panic.
source "$(dirname "$0")/common.sh"
ensure_build_deps
cd "$ROOT"

SECS="${1:-60}"
[ $# -gt 0 ] && shift
ALL_TARGETS=(tracking_api log_recovery filter config rpc_decode tracking_plan)
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=("${ALL_TARGETS[@]}")
SANITIZER="${SLUICE_FUZZ_SANITIZER:-none}"
if [ "$SECS" = 0 ]; then
  log "fuzzing skipped (0 seconds per target)"
  exit 0
fi

# cargo-fuzz, installed once under $SLUICE_CACHE/tools.
TOOLS="$SLUICE_CACHE/tools"
export PATH="$TOOLS/bin:$PATH"
if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz into $TOOLS"
  cargo install cargo-fuzz --locked --root "$TOOLS"
fi

export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="$SLUICE_CACHE/fuzz-target"
FLAGS=(-O -a -s "$SANITIZER")
log "building the fuzz targets (target dir: $CARGO_TARGET_DIR)"
(cd fuzz && cargo fuzz build "${FLAGS[@]}" --target-dir "$CARGO_TARGET_DIR" 2>&1 | { grep -v '^ *Compiling ' >&2 || true; }) \
  || { log "fuzz build failed"; exit 1; }
BIN_DIR="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release"

# Scratch space: corpora grown during this run, the targets' temporary
# files (tmpfs when there is one: the log targets fsync), crash artifacts.
scratch_parent="${TMPDIR:-/tmp}"
[ -d /dev/shm ] && [ -w /dev/shm ] && scratch_parent=/dev/shm
SCRATCH="$(mktemp -d "$scratch_parent/sluice-fuzz.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT
KEEP="$SLUICE_CACHE/fuzz-artifacts"

failed=()
summary=()
for t in "${TARGETS[@]}"; do
  corpus="$ROOT/fuzz/corpus/$t"
  work="$SCRATCH/corpus/$t"
  mkdir -p "$work" "$SCRATCH/artifacts/$t" "$SCRATCH/tmp/$t" "$corpus"
  log "fuzzing $t for ${SECS}s (corpus: fuzz/corpus/$t, $(ls "$corpus" | wc -l) inputs)"
  out="$SCRATCH/$t.log"
  # New inputs go to the first directory (scratch); the repo's is read only.
  set +e
  TMPDIR="$SCRATCH/tmp/$t" "$BIN_DIR/$t" "$work" "$corpus" \
    -max_total_time="$SECS" -rss_limit_mb=2048 -timeout=10 \
    -print_final_stats=1 -artifact_prefix="$SCRATCH/artifacts/$t/" >"$out" 2>&1
  rc=$?
  set -e
  rm -rf "$SCRATCH/tmp/$t"
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$out" | tail -1)"
  rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$out" | tail -1)"
  cov="$({ grep -o 'cov: [0-9]*' "$out" || true; } | tail -1)"
  summary+=("$t: ${execs:-?} execs, ${rate:-?}/s, ${cov:-cov: ?}, rc $rc")
  if [ "$rc" -ne 0 ]; then
    tail -n 60 "$out" >&2
    mkdir -p "$KEEP/$t"
    found=0
    for a in "$SCRATCH/artifacts/$t"/*; do
      [ -e "$a" ] || continue
      cp "$a" "$KEEP/$t/"
      found=1
      log "CRASH in $t: reproducer $KEEP/$t/$(basename "$a")"
      log "  reproduce: $BIN_DIR/$t $KEEP/$t/$(basename "$a")"
    done
    [ $found -eq 1 ] || log "$t exited $rc without a reproducer (log above)"
    failed+=("$t")
  elif [ "${SLUICE_FUZZ_MERGE:-0}" = 1 ]; then
    log "merging new inputs of $t into fuzz/corpus/$t"
    # Edge coverage only (no hit counts): a lean corpus, a few hundred inputs.
    TMPDIR="$SCRATCH" "$BIN_DIR/$t" -merge=1 -use_counters=0 -rss_limit_mb=2048 -timeout=10 "$corpus" "$work" >"$out.merge" 2>&1 \
      || { tail -n 20 "$out.merge" >&2; failed+=("$t (merge)"); }
  fi
done

log "fuzzing summary:"
for s in "${summary[@]}"; do log "  $s"; done
if [ ${#failed[@]} -gt 0 ]; then
  log "fuzzing found crashes in: ${failed[*]} (reproducers under $KEEP)"
  exit 1
fi
