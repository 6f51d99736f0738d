#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need,
# then runs every test of the workspace (unit, spec, property, SDK
# compatibility, crash and headless-browser console tests, the Log suite
# against the embedded log, rdkafka's MockCluster and a real Kafka broker,
# the JobDB suite against SQLite, MariaDB and PostgreSQL, and the S3 archive
# against moto). Extra arguments go to `cargo test`.
source "$(dirname "$0")/common.sh"
ensure_build_deps
cd "$ROOT"
# Style and lints first (the workspace's lints are in Cargo.toml): a
# warning fails the suite. Clippy checks in the release profile, so its
# build scripts (librdkafka's cmake) are the ones the tests build reuses.
for component in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
    log "installing the rustup component $component"
    rustup component add "$component"
  fi
done
log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy (warnings are errors)"
cargo clippy --release --workspace --all-targets -- -D warnings
while IFS='=' read -r key value; do export "$key=$value"; done < <(bash scripts/setup-compat.sh)
while IFS='=' read -r key value; do export "$key=$value"; done < <(bash scripts/setup-browser.sh)
# moto's S3 server for the S3 archive tests (they start and stop it).
# SLUICE_REQUIRE_S3 makes them fail (not skip) if it is missing.
s3_env="$(bash scripts/setup-s3.sh)"
while IFS='=' read -r key value; do export "$key=$value"; done <<<"$s3_env"
export SLUICE_REQUIRE_S3=1
# MariaDB and PostgreSQL for the JobDB suite, on free ports, stopped at exit.
# SLUICE_REQUIRE_SQL makes a JobDB test fail (not skip) if a server is missing.
SQL_DIR="$(mktemp -d "${TMPDIR:-/tmp}/sluice-sql.XXXXXX")"
chmod 755 "$SQL_DIR"  # the postgres user must reach its data directory
KAFKA_DIR="$SQL_DIR/kafka"
KAFKA_TLS_DIR="$SQL_DIR/kafka-tls"
stop_services() {
  bash scripts/kafka.sh stop "$KAFKA_DIR" || true
  bash scripts/kafka.sh stop "$KAFKA_TLS_DIR" || true
  bash scripts/sql.sh stop "$SQL_DIR/mariadb" || true
  bash scripts/sql.sh stop "$SQL_DIR/postgres" || true
  bash scripts/sql.sh stop "$SQL_DIR/mariadb-tls" || true
  bash scripts/sql.sh stop "$SQL_DIR/postgres-tls" || true
  rm -rf "$SQL_DIR"
}
trap stop_services EXIT
sql_urls="$(bash scripts/sql.sh start-mariadb "$SQL_DIR/mariadb" "$(bash scripts/sql.sh free-port 33306)")"
sql_urls+=$'\n'"$(bash scripts/sql.sh start-postgres "$SQL_DIR/postgres" "$(bash scripts/sql.sh free-port 35432)")"
while IFS='=' read -r key value; do export "$key=$value"; done <<<"$sql_urls"
export SLUICE_REQUIRE_SQL=1
# Apache Kafka (Maven Central jars, KRaft, 127.0.0.1) for the Log suite;
# the Kafka-mode tests start private brokers of their own with the same script.
# SLUICE_REQUIRE_KAFKA makes them fail (not skip) without a broker.
kafka_port="$(bash scripts/sql.sh free-port 39092)"
kafka_env="$(bash scripts/kafka.sh start sluice-test "$kafka_port" "$(bash scripts/sql.sh free-port 39093)" "$KAFKA_DIR")"
export SLUICE_TEST_KAFKA_BOOTSTRAP="${kafka_env#KAFKA_BOOTSTRAP=}"
export SLUICE_REQUIRE_KAFKA=1
# TLS and SASL (docs/plans/TLS.md): test certificates from scripts/certs.sh,
# one broker with SSL (mTLS) and SASL_SSL (SCRAM, PLAIN) listeners, and TLS-only
# MariaDB and PostgreSQL instances beside the plain ones, all stopped at exit.
cert_env="$(bash scripts/certs.sh "$SQL_DIR/certs")"
while IFS='=' read -r key value; do export "$key=$value"; done <<<"$cert_env"
kafka_tls_port="$(bash scripts/sql.sh free-port 39192)"
kafka_tls_cport="$(bash scripts/sql.sh free-port $((kafka_tls_port + 1)))"
kafka_ssl_port="$(bash scripts/sql.sh free-port $((kafka_tls_cport + 1)))"
kafka_sasl_ssl_port="$(bash scripts/sql.sh free-port $((kafka_ssl_port + 1)))"
kafka_tls_env="$(bash scripts/kafka.sh start-secure sluice-test-tls "$kafka_tls_port" "$kafka_tls_cport" \
  "$kafka_ssl_port" "$kafka_sasl_ssl_port" "$KAFKA_TLS_DIR" "$SLUICE_TEST_CERT_DIR")"
while IFS='=' read -r key value; do
  case "$key" in
    KAFKA_SSL_BOOTSTRAP | KAFKA_SASL_SSL_BOOTSTRAP | KAFKA_SCRAM_USER | KAFKA_SCRAM_PASSWORD) export "SLUICE_TEST_$key=$value" ;;
    # Its plain-text listener: the tests' "TLS client on a plain port" case.
    KAFKA_BOOTSTRAP) export "SLUICE_TEST_KAFKA_SECURE_PLAIN_BOOTSTRAP=$value" ;;
  esac
done <<<"$kafka_tls_env"
tls_urls="$(bash scripts/sql.sh start-mariadb "$SQL_DIR/mariadb-tls" "$(bash scripts/sql.sh free-port 33316)" "$SLUICE_TEST_CERT_DIR")"
tls_urls+=$'\n'"$(bash scripts/sql.sh start-postgres "$SQL_DIR/postgres-tls" "$(bash scripts/sql.sh free-port 35442)" "$SLUICE_TEST_CERT_DIR")"
while IFS='=' read -r key value; do export "$key=$value"; done <<<"$tls_urls"
log "building and running the tests (target dir: $CARGO_TARGET_DIR)"
cargo test --release --workspace "$@"
# The suite and `scripts/run.sh` share one build (the feature pins in
# crates/sluice/Cargo.toml); if a dependency update broke that, build the
# binary here so that the next `scripts/run.sh` starts at once, and say so.
build_log="$(cargo build --release -p sluice -v 2>&1)" || { printf '%s\n' "$build_log" >&2; exit 1; }
if grep -q '^ *Compiling' <<<"$build_log"; then
  log "warning: \`cargo build -p sluice\` rebuilt after the tests: update the feature pins in crates/sluice/Cargo.toml"
fi
log "fuzzing (docs/FUZZING.md): each target for ${SLUICE_FUZZ_SECONDS:-60}s"
bash scripts/fuzz.sh "${SLUICE_FUZZ_SECONDS:-60}"
# Three minutes of the chaos soak (docs/RELIABILITY.md; scripts/soak.sh
# runs it longer): SIGKILLs of every role, broker and PostgreSQL restarts on
# the scaled-out topology; every acknowledged event must be delivered.
# SLUICE_SOAK_MINUTES=0 skips it.
if [ "${SLUICE_SOAK_MINUTES:-3}" != 0 ]; then
  log "chaos soak (docs/RELIABILITY.md): ${SLUICE_SOAK_MINUTES:-3} minutes of SIGKILLs and broker and database restarts on the scaled-out topology"
  SLUICE_SOAK_MINUTES="${SLUICE_SOAK_MINUTES:-3}" SLUICE_SOAK_PG_DIR="$SQL_DIR/postgres" \
    cargo test --release -p sluice --test soak chaos_soak -- --exact --nocapture
fi
