#!/usr/bin/env bash
# The chaos soak (docs/RELIABILITY.md): the scaled-out topology (one Kafka
# broker, PostgreSQL, 2 ingest, 2 dedup, 2 route, 2 director processes)
# under SDK-shaped traffic with ~1% client resends.
#
#   scripts/soak.sh [minutes]
#       First SLUICE_RESTART_CYCLES (default 20; 0 skips them) broker
#       restarts under traffic, each followed by every acknowledged event
#       delivered within SLUICE_RESTART_BOUND_SECS (60); then the chaos soak
#       for [minutes] (default 30): every ~30 s a random process is killed
#       with SIGKILL (a sluice process, the broker, or PostgreSQL's
#       postmaster; SLUICE_SOAK_DB_FAULTS=0 spares the database) and started
#       again; at the end every
#       acknowledged event must be delivered, duplicates within the director
#       crash window, no panic, RSS bounded.
#
# The tests are crates/sluice/tests/soak.rs (broker_restart_cycles,
# chaos_soak); the test starts its own broker (scripts/kafka.sh), this script
# PostgreSQL (scripts/sql.sh, restarted by the soak through
# SLUICE_SOAK_PG_DIR) and installs the Python and Node SDKs for the SDK waves.
# Environment: SLUICE_SOAK_RATE (events/s, 150), SLUICE_SOAK_KILL_EVERY_SECS
# (30), SLUICE_SOAK_MAX_RSS_MB (1024), SLUICE_SOAK_DRAIN_SECS (300),
# SLUICE_SOAK_REPORT (write the soak's figures there as JSON),
# SLUICE_SOAK_LOG_DIR (keep every process's log and the broker's there).
source "$(dirname "$0")/common.sh"
MINUTES="${1:-30}"
ensure_build_deps
cd "$ROOT"
# The official SDKs for the SDK waves (the soak runs without them, saying so).
while IFS='=' read -r key value; do export "$key=$value"; done < <(bash scripts/setup-compat.sh || true)
bash scripts/kafka.sh fetch
SQL_DIR="$(mktemp -d "${TMPDIR:-/tmp}/sluice-soak.XXXXXX")"
chmod 755 "$SQL_DIR"  # the postgres user must reach its data directory
trap 'bash scripts/sql.sh stop "$SQL_DIR/postgres" || true; rm -rf "$SQL_DIR"' EXIT
sql_url="$(bash scripts/sql.sh start-postgres "$SQL_DIR/postgres" "$(bash scripts/sql.sh free-port 35432)")"
export "${sql_url?}"
export SLUICE_SOAK_PG_DIR="$SQL_DIR/postgres" SLUICE_REQUIRE_SQL=1 SLUICE_REQUIRE_KAFKA=1
log "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GB; load $(cut -d' ' -f1-3 /proc/loadavg)"
cargo test --release -p sluice --test soak --no-run
CYCLES="${SLUICE_RESTART_CYCLES:-20}"
if [ "$CYCLES" -gt 0 ]; then
  log "$CYCLES broker restarts under traffic"
  SLUICE_RESTART_CYCLES="$CYCLES" cargo test --release -p sluice --test soak broker_restart_cycles -- --exact --nocapture
fi
log "chaos soak, $MINUTES minutes"
SLUICE_SOAK_MINUTES="$MINUTES" cargo test --release -p sluice --test soak chaos_soak -- --exact --nocapture
log "load after the soak: $(cut -d' ' -f1-3 /proc/loadavg)"
