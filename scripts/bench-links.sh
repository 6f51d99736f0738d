#!/usr/bin/env bash
# Encrypted links against plain text, in one sitting (issue 12's benchmark).
#
#   scripts/bench-links.sh [seconds] [rounds]
#
# Runs `sluice bench e2e` with the log on Apache Kafka and the JobDBs in
# PostgreSQL, closed loop, `rounds` times (default 2) in each of two modes,
# alternating so that a noisy minute hits both:
#   plain      Kafka PLAINTEXT listener, PostgreSQL without TLS, HTTP ingest;
#   encrypted  Kafka SASL_SSL (SCRAM-SHA-512, CA-verified), PostgreSQL with
#              sslmode=verify-full, the Tracking API over HTTPS (the load
#              generator speaks TLS, checking the certificate).
# Each run gets a fresh broker (`scripts/kafka.sh start-secure`: the same
# broker configuration, with its TLS listeners, for both modes) and a fresh
# database. Certificates come from scripts/certs.sh. The delivery to the
# bench's own webhook sink stays plain HTTP in both modes (a destination's
# TLS is the destination's; not a Sluice link), as does nothing else: `serve`
# runs route and director in one process, so there is no RPC link.
#
# Prints each run's summary, then the median sustained rate of each mode and
# their ratio (encrypted / plain; issue 12's target is >= 0.8).
# Environment: WARMUP (seconds, default 10); SLUICE_BIN (default $CARGO_TARGET_DIR/release/sluice, built
# if missing); ENCRYPT, the links the encrypted mode encrypts (default
# "kafka,postgres,https"; e.g. ENCRYPT=kafka to see one link's cost).
source "$(dirname "$0")/common.sh"
set -euo pipefail

SECONDS_PER_RUN="${1:-20}"
ENCRYPT="${ENCRYPT:-kafka,postgres,https}"
encrypts() { [[ ",$ENCRYPT," == *",$1,"* ]]; }
ROUNDS="${2:-2}"
# Seconds of load before the measured window. Each run starts a fresh JVM
# broker, whose JIT compiler is still busy for its first half minute (perf:
# C2 compiler threads took 10-14% of the machine in a window starting 12 s
# after the run began); 10 s of warm-up keeps most of that out of the window.
WARMUP="${WARMUP:-10}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sluice/target}"
B="${SLUICE_BIN:-$CARGO_TARGET_DIR/release/sluice}"
if [ ! -x "$B" ]; then
  (cd "$ROOT" && cargo build --release -p sluice)
fi

# Not under /root: PostgreSQL runs as the user postgres and must reach it.
W="$(mktemp -d /tmp/sluice-bench-links.XXXXXX)"
chmod 755 "$W"
cleanup() {
  for d in "$W"/k-*; do [ -d "$d" ] && bash "$ROOT/scripts/kafka.sh" stop "$d" >/dev/null 2>&1 || true; done
  for d in "$W"/pg-*; do [ -d "$d" ] && bash "$ROOT/scripts/sql.sh" stop "$d" >/dev/null 2>&1 || true; done
  rm -rf "$W"
}
trap cleanup EXIT

bash "$ROOT/scripts/certs.sh" "$W/certs" >/dev/null
CERTS="$W/certs"
# Ports below the kernel's ephemeral range (32768-), which a client's
# outgoing connection could hold when the broker binds.
free() { bash "$ROOT/scripts/sql.sh" free-port "$1"; }

run() { # mode round
  local mode="$1" round="$2" kdir="$W/k-$1-$2" pgdir="$W/pg-$1-$2"
  local p c s q pg url env_line
  p="$(free 21092)"; c="$(free $((p + 1)))"; s="$(free $((c + 1)))"; q="$(free $((s + 1)))"
  bash "$ROOT/scripts/kafka.sh" start-secure "bench-links-$mode-$round" "$p" "$c" "$s" "$q" "$kdir" "$CERTS" >/dev/null
  if [ "$mode" = plain ]; then
    url="$(bash "$ROOT/scripts/sql.sh" start-postgres "$pgdir" "$(free 25432)" | sed -n 's/^SLUICE_TEST_POSTGRES_URL=//p')"
    "$B" bench e2e --seconds "$SECONDS_PER_RUN" --warmup "$WARMUP" --kafka "127.0.0.1:$p" --jobdb-url "$url"
  else
    local args=()
    if encrypts postgres; then
      url="$(bash "$ROOT/scripts/sql.sh" start-postgres "$pgdir" "$(free 25432)" "$CERTS" | sed -n 's/^SLUICE_TEST_POSTGRES_TLS_URL=//p')"
    else
      url="$(bash "$ROOT/scripts/sql.sh" start-postgres "$pgdir" "$(free 25432)" | sed -n 's/^SLUICE_TEST_POSTGRES_URL=//p')"
    fi
    if encrypts kafka; then
      args+=(--kafka "127.0.0.1:$q" --kafka-option security_protocol=sasl_ssl --kafka-option "tls_ca_file=$CERTS/ca.pem"
        --kafka-option sasl_mechanism=SCRAM-SHA-512 --kafka-option sasl_username=sluice)
    else
      args+=(--kafka "127.0.0.1:$p")
    fi
    if encrypts https; then
      args+=(--tls-cert "$CERTS/server.pem" --tls-key "$CERTS/server.key" --tls-ca "$CERTS/ca.pem")
    fi
    local password=()
    encrypts kafka && password=(SLUICE_LOG__KAFKA__PRIMARY__SASL_PASSWORD=sluice-secret)
    env "${password[@]}" "$B" bench e2e --seconds "$SECONDS_PER_RUN" --warmup "$WARMUP" --jobdb-url "$url" "${args[@]}"
  fi
  bash "$ROOT/scripts/kafka.sh" stop "$kdir" >/dev/null 2>&1 || true
  bash "$ROOT/scripts/sql.sh" stop "$pgdir" >/dev/null 2>&1 || true
  rm -rf "$kdir" "$pgdir"
}

: >"$W/results"
for round in $(seq 1 "$ROUNDS"); do
  for mode in plain encrypted; do
    log "round $round: $mode"
    out="$(run "$mode" "$round")"
    printf '%s\n' "$out"
    rate="$(printf '%s\n' "$out" | sed -n 's/.*acked in window: \([0-9]*\) events\/s.*/\1/p' | head -1)"
    [ -n "$rate" ] || { echo "no rate in the $mode run's output" >&2; exit 1; }
    cpu="$(printf '%s\n' "$out" | sed -n 's/.*server [0-9.]* s (\([0-9.]*\) ms per 1,000 events), whole machine [0-9.]* s (\([0-9.]*\) ms per 1,000.*/\1 \2/p' | head -1)"
    echo "$mode $rate ${cpu:-? ?}" >>"$W/results"
  done
done

median() { sort -n | awk '{a[NR]=$1} END {if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
plain="$(awk '$1=="plain"{print $2}' "$W/results" | median)"
enc="$(awk '$1=="encrypted"{print $2}' "$W/results" | median)"
echo
echo "runs (mode, events/s, CPU ms per 1,000 events: server, whole machine):"
sed 's/^/  /' "$W/results"
echo "median sustained events/s: plain $plain, encrypted ($ENCRYPT) $enc"
awk -v p="$plain" -v e="$enc" 'BEGIN {printf "ratio encrypted/plain: %.2f   (target >= 0.8)\n", e / p}'
for col in 3 4; do
  what=$([ "$col" = 3 ] && echo "server" || echo "whole machine")
  cp_="$(awk -v c="$col" '$1=="plain" && $c!="?"{print $c}' "$W/results" | median)"
  ce="$(awk -v c="$col" '$1=="encrypted" && $c!="?"{print $c}' "$W/results" | median)"
  if [ -n "$cp_" ] && [ -n "$ce" ]; then echo "median CPU per 1,000 events, $what: plain $cp_ ms, encrypted $ce ms"; fi
done
