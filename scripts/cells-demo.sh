#!/usr/bin/env bash
# A local cell deployment on this machine: `scripts/cells-demo.sh [DIR]`.
#
# Starts a control plane, three cells (`sluice serve`, embedded), two
# routers and a webhook sink (`sluice sink`), with the global store in an
# SQLite file; makes two workspaces (a source and a webhook destination
# each) through the control plane's API; prints where to send events and how
# to look at what happened. Everything listens on 127.0.0.1 and stops on
# Ctrl-C. Logs and data go to DIR (default: a new folder under /tmp).
source "$(dirname "$0")/common.sh"
ensure_build_deps
cd "$ROOT"
cargo build --release -p sluice --quiet
BIN="$CARGO_TARGET_DIR/release/sluice"
DIR="${1:-$(mktemp -d "${TMPDIR:-/tmp}/sluice-cells.XXXXXX")}"
mkdir -p "$DIR"
PIDS=()
cleanup() {
  trap - EXIT INT TERM
  log "stopping"
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  log "logs and data are in $DIR"
}
trap cleanup EXIT INT TERM

port() { bash scripts/sql.sh free-port "$1"; }
json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
wait_http() {
  for _ in $(seq 1 200); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done
  log "$1 did not answer; see the logs in $DIR"; exit 1
}

export SLUICE_GLOBAL_STORE="$DIR/global.sqlite"
CONTROL_TOKEN="$(openssl rand -hex 24)"
CP_PORT="$(port 8060)"
CP="http://127.0.0.1:$CP_PORT"
cat >"$DIR/control.toml" <<EOF
[control]
listen = "127.0.0.1:$CP_PORT"
token = "$CONTROL_TOKEN"
scrape_interval = "2s"
# The demo's destinations are on this machine.
allow_private_network_destinations = true
EOF
"$BIN" control --config "$DIR/control.toml" >"$DIR/control.log" 2>&1 &
PIDS+=($!)
wait_http "$CP/healthz"
api() { curl -sf -H "authorization: Bearer $CONTROL_TOKEN" -H 'content-type: application/json' "$@"; }

for n in 1 2 3; do
  id="c$n"
  ingest="$(port $((8180 + n)))"
  admin="$(port $((8190 + n)))"
  api -X PUT "$CP/api/cells/$id" -d "{\"tier\":\"smb\",\"ingest_url\":\"http://127.0.0.1:$ingest\",\"admin_url\":\"http://127.0.0.1:$admin\",\"state\":\"provisioning\"}" >/dev/null
  token="$(api -X POST "$CP/api/cells/$id/token" | json '["token"]')"
  cat >"$DIR/$id.toml" <<EOF
[server]
listen = "127.0.0.1:$ingest"
data_dir = "$DIR/$id"
trusted_proxies = ["127.0.0.1"]
[admin]
listen = "127.0.0.1:$admin"
[cell]
id = "$id"
control_url = "$CP"
token = "$token"
EOF
  "$BIN" serve --config "$DIR/$id.toml" >"$DIR/$id.log" 2>&1 &
  PIDS+=($!)
  wait_http "http://127.0.0.1:$admin/healthz"
  api -X POST "$CP/api/cells/$id/state" -d '{"state":"active"}' >/dev/null
  log "cell $id: Tracking API http://127.0.0.1:$ingest, admin http://127.0.0.1:$admin"
done

ROUTERS=()
for n in 1 2; do
  listen="$(port $((8068 + 2 * n)))"
  admin="$(port $((8069 + 2 * n)))"
  printf '[router]\nlisten = "127.0.0.1:%s"\nadmin_listen = "127.0.0.1:%s"\n' "$listen" "$admin" >"$DIR/router$n.toml"
  "$BIN" router --config "$DIR/router$n.toml" >"$DIR/router$n.log" 2>&1 &
  PIDS+=($!)
  wait_http "http://127.0.0.1:$admin/healthz"
  ROUTERS+=("http://127.0.0.1:$listen")
  log "router $n: http://127.0.0.1:$listen (metrics http://127.0.0.1:$admin/metrics)"
done

SINK_PORT="$(port 9099)"
"$BIN" sink --listen "127.0.0.1:$SINK_PORT" >"$DIR/sink.log" 2>&1 &
PIDS+=($!)

declare -A KEYS
for ws in acme globex; do
  api -X PUT "$CP/api/workspaces/$ws" -d '{"tier":"smb"}' >/dev/null
  KEYS[$ws]="$(api -X POST "$CP/api/workspaces/$ws/sources" -d "{\"id\":\"$ws-web\"}" | json '["write_key"]')"
  api -X PUT "$CP/api/workspaces/$ws/destinations/$ws-hook" \
    -d "{\"url\":\"http://127.0.0.1:$SINK_PORT/$ws\",\"allow_private_network\":true}" >/dev/null
  api -X PUT "$CP/api/workspaces/$ws/connections/$ws-web/$ws-hook" >/dev/null
done

cat <<EOF

Sluice cells are running (data and logs in $DIR).

Send events through either router; each workspace is placed on a cell on
its first request and stays there (the answer's X-Sluice-Cell says which):

  curl -i -u ${KEYS[acme]}: -H 'content-type: application/json' \\
    -d '{"type":"track","event":"Hi","userId":"u1"}' ${ROUTERS[0]}/v1/track
  curl -i -u ${KEYS[globex]}: -H 'content-type: application/json' \\
    -d '{"type":"track","event":"Hi","userId":"u2"}' ${ROUTERS[1]}/v1/track

Or point a Segment SDK at a router with one of these write keys:
  acme    ${KEYS[acme]}
  globex  ${KEYS[globex]}

What arrives at the destinations: tail -f $DIR/sink.log
The control plane (token in $DIR/control.toml):
  curl -s -H 'authorization: Bearer $CONTROL_TOKEN' $CP/api/cells
  curl -s -H 'authorization: Bearer $CONTROL_TOKEN' $CP/api/workspaces
  curl -s -H 'authorization: Bearer $CONTROL_TOKEN' '$CP/api/usage?workspace=acme'
  SLUICE_GLOBAL_STORE=$SLUICE_GLOBAL_STORE $BIN usage --workspace acme

Ctrl-C stops everything.
EOF
wait
