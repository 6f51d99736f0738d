#!/usr/bin/env bash
# Throwaway MariaDB and PostgreSQL servers for the JobDB tests, from Debian's
# packages, listening on 127.0.0.1 only.
#
#   scripts/sql.sh start-mariadb <dir> <port> [<cert-dir>]
#       Install mariadb-server if missing, initialise a data directory in
#       <dir>/data (first start only), start mariadbd in the background (pid,
#       socket and error log in <dir>), create the user sluice/sluice with
#       every privilege, and print SLUICE_TEST_MYSQL_URL=mysql://...
#       With <cert-dir> (scripts/certs.sh; generated there if missing): TLS
#       with its server.pem/server.key/ca.pem, --require-secure-transport=ON,
#       the user sluice REQUIRE SSL, and instead print
#       SLUICE_TEST_MYSQL_TLS_URL=mysql://...?ssl-mode=VERIFY_IDENTITY&ssl-ca=...
#   scripts/sql.sh start-postgres <dir> <port> [<cert-dir>]
#       initdb <dir>/data (first start only; trust authentication for local
#       connections), start postgres in the background (socket and log in
#       <dir>), and print SLUICE_TEST_POSTGRES_URL=postgres://...
#       As root, the server runs as the user postgres: <dir> is given to it,
#       and every parent of <dir> must let it through (so not under /root).
#       With <cert-dir>: ssl=on with a copy of its certificates in <dir>/tls
#       (key 0600, owned by the server's user), TCP only over TLS with a
#       password (pg_hba in <dir>/tls/pg_hba.conf: local trust, hostssl
#       scram-sha-256, hostnossl reject), the password sluice-pg-secret for
#       postgres, and instead print
#       SLUICE_TEST_POSTGRES_TLS_URL=postgres://...?sslmode=verify-full&sslrootcert=...
#   scripts/sql.sh stop <dir>
#       Stop the server started on <dir> (either kind) and wait for it to exit.
#   scripts/sql.sh free-port <first>
#       Print the first port from <first> up that nothing listens on.
#
# Starting a running instance again only prints its URL; stopping a stopped
# one does nothing. Environment: PG_BIN (default the newest
# /usr/lib/postgresql/*/bin), SQL_START_TIMEOUT (60 s).
source "$(dirname "$0")/common.sh"

usage() {
  sed -n '2,/^source /p' "$0" | sed -e '/^source /d' -e 's/^# \{0,1\}//' >&2
  exit 2
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

PG_TLS_PASSWORD=sluice-pg-secret

# cert_dir DIR: DIR made absolute, with the certificates of scripts/certs.sh
# (generated there if missing)
cert_dir() {
  local certs="$1"
  mkdir -p "$certs"
  certs="$(cd "$certs" && pwd)"
  [ -f "$certs/done" ] || bash "$(dirname "$0")/certs.sh" "$certs" >&2
  echo "$certs"
}

free_port() {
  [ $# -eq 1 ] || usage
  local port="$1"
  while port_open "$port"; do port=$((port + 1)); done
  echo "$port"
}

# pid from pid file $1 if that process runs
running_pid() {
  local pid
  [ -f "$1" ] || return 1
  pid="$(tr -d '[:space:]' <"$1")"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

# wait_ready NAME PID LOG CHECK...: until CHECK succeeds; fail if PID exits or on timeout
wait_ready() {
  local name="$1" pid="$2" logfile="$3"
  shift 3
  local deadline=$((SECONDS + ${SQL_START_TIMEOUT:-60}))
  until "$@" >/dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "$name exited during startup; last log lines:"
      tail -n 30 "$logfile" >&2 2>/dev/null || true
      return 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "$name did not start within ${SQL_START_TIMEOUT:-60}s; last log lines:"
      tail -n 30 "$logfile" >&2 2>/dev/null || true
      return 1
    fi
    sleep 0.2
  done
}

start_mariadb() {
  [ $# -eq 2 ] || [ $# -eq 3 ] || usage
  local dir="$1" port="$2" certs="${3:-}" pid
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  local url="mysql://sluice:sluice@127.0.0.1:$port"
  if pid="$(running_pid "$dir/mariadb.pid")"; then
    log "mariadb already running (pid $pid) on $dir"
    cat "$dir/url"
    return 0
  fi
  if port_open "$port"; then log "port $port is already in use"; exit 1; fi
  command -v mariadbd >/dev/null && command -v mariadb-install-db >/dev/null || apt_ensure mariadb-server
  # Debian's package starts a system server on 3306 when it is installed; ours never uses it.
  local user=()
  [ "$(id -u)" -eq 0 ] && user=(--user=root)
  if [ ! -d "$dir/data/mysql" ]; then
    log "initialising a MariaDB data directory in $dir/data"
    rm -rf "$dir/data"
    mariadb-install-db --no-defaults "${user[@]}" --datadir="$dir/data" \
      --auth-root-authentication-method=socket --skip-test-db >"$dir/install.log" 2>&1 ||
      { cat "$dir/install.log" >&2; exit 1; }
  fi
  # TLS: clients must use it over TCP (the root user's unix socket still works).
  local tls=() require=""
  if [ -n "$certs" ]; then
    certs="$(cert_dir "$certs")"
    tls=(--ssl-cert="$certs/server.pem" --ssl-key="$certs/server.key" --ssl-ca="$certs/ca.pem"
      --require-secure-transport=ON)
    require=" REQUIRE SSL"
    log "starting mariadb on 127.0.0.1:$port (TLS only, certificates from $certs), data in $dir"
  else
    log "starting mariadb on 127.0.0.1:$port, data in $dir"
  fi
  setsid mariadbd --no-defaults "${user[@]}" --datadir="$dir/data" --port="$port" \
    --bind-address=127.0.0.1 --socket="$dir/mariadb.sock" --pid-file="$dir/mariadb.pid" \
    --log-error="$dir/mariadb.err" --skip-name-resolve --innodb-buffer-pool-size=128M \
    --max-connections=500 "${tls[@]}" </dev/null >/dev/null 2>&1 &
  pid=$!
  echo "$pid" >"$dir/mariadb.pid"
  wait_ready mariadb "$pid" "$dir/mariadb.err" mariadb --no-defaults -S "$dir/mariadb.sock" -u root -e 'SELECT 1' ||
    { stop "$dir"; exit 1; }
  mariadb --no-defaults -S "$dir/mariadb.sock" -u root -e "
    CREATE USER IF NOT EXISTS 'sluice'@'127.0.0.1' IDENTIFIED BY 'sluice'$require;
    GRANT ALL PRIVILEGES ON *.* TO 'sluice'@'127.0.0.1'$require WITH GRANT OPTION;" ||
    { stop "$dir"; exit 1; }
  if [ -n "$certs" ]; then
    echo "SLUICE_TEST_MYSQL_TLS_URL=$url?ssl-mode=VERIFY_IDENTITY&ssl-ca=$certs/ca.pem" >"$dir/url"
  else
    echo "SLUICE_TEST_MYSQL_URL=$url" >"$dir/url"
  fi
  log "mariadb ready (pid $pid)"
  cat "$dir/url"
}

pg_bin() {
  if [ -n "${PG_BIN:-}" ]; then echo "$PG_BIN"; return 0; fi
  local bin
  bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
  if [ -z "$bin" ]; then
    apt_ensure postgresql
    bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
  fi
  echo "$bin"
}

# Run a PostgreSQL program as its owner: postgres when we are root, else ourselves.
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start_postgres() {
  [ $# -eq 2 ] || [ $# -eq 3 ] || usage
  local dir="$1" port="$2" certs="${3:-}" bin
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  bin="$(pg_bin)"
  if [ -f "$dir/data/postmaster.pid" ] && as_pg "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
    log "postgres already running on $dir"
    cat "$dir/url"
    return 0
  fi
  if port_open "$port"; then log "port $port is already in use"; exit 1; fi
  # TLS: the server's own copy of the certificates (PostgreSQL refuses a key
  # that others can read) and a pg_hba.conf that takes TCP only over TLS; both
  # live in <dir>/tls and are passed as options, so data/ stays as initdb made it.
  local tls=""
  if [ -n "$certs" ]; then
    certs="$(cert_dir "$certs")"
    mkdir -p "$dir/tls"
    cp "$certs/server.pem" "$certs/server.key" "$certs/ca.pem" "$dir/tls/"
    chmod 0600 "$dir/tls/server.key"
    cat >"$dir/tls/pg_hba.conf" <<'EOF'
# Generated by scripts/sql.sh (TLS instance).
local     all all                trust
hostssl   all all 127.0.0.1/32   scram-sha-256
hostnossl all all 127.0.0.1/32   reject
EOF
    tls="-c ssl=on -c ssl_cert_file=$dir/tls/server.pem -c ssl_key_file=$dir/tls/server.key"
    tls+=" -c ssl_ca_file=$dir/tls/ca.pem -c hba_file=$dir/tls/pg_hba.conf -c password_encryption=scram-sha-256"
  fi
  if [ "$(id -u)" -eq 0 ]; then
    chown -R postgres: "$dir"
    runuser -u postgres -- test -w "$dir" ||
      { log "the user postgres cannot reach $dir (is a parent directory private, e.g. /root?)"; exit 1; }
  fi
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    log "initialising a PostgreSQL data directory in $dir/data"
    rm -rf "$dir/data"
    as_pg "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 ||
      { cat "$dir/initdb.log" >&2; exit 1; }
  fi
  if [ -n "$certs" ]; then
    log "starting postgres on 127.0.0.1:$port (TLS only, certificates from $certs), data in $dir"
  else
    log "starting postgres on 127.0.0.1:$port, data in $dir"
  fi
  as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -s \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=on${tls:+ $tls}" start >/dev/null ||
    { tail -n 30 "$dir/postgres.log" >&2; exit 1; }
  local pid
  pid="$(head -n 1 "$dir/data/postmaster.pid" 2>/dev/null || true)"
  wait_ready postgres "${pid:-0}" "$dir/postgres.log" as_pg "$bin/pg_isready" -q -h 127.0.0.1 -p "$port" ||
    { stop "$dir"; exit 1; }
  if [ -n "$certs" ]; then
    as_pg "$bin/psql" -X -q -h "$dir" -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 \
      -c "ALTER USER postgres PASSWORD '$PG_TLS_PASSWORD'" ||
      { stop "$dir"; exit 1; }
    echo "SLUICE_TEST_POSTGRES_TLS_URL=postgres://postgres:$PG_TLS_PASSWORD@127.0.0.1:$port/postgres?sslmode=verify-full&sslrootcert=$certs/ca.pem" >"$dir/url"
  else
    echo "SLUICE_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:$port/postgres" >"$dir/url"
  fi
  log "postgres ready (pid $pid)"
  cat "$dir/url"
}

stop() {
  [ $# -eq 1 ] || usage
  local dir="$1" pid stopped=0
  [ -d "$dir" ] || { log "nothing running on $dir"; return 0; }
  if pid="$(running_pid "$dir/mariadb.pid")"; then
    log "stopping mariadb (pid $pid) on $dir"
    kill "$pid"
    local deadline=$((SECONDS + 30))
    while kill -0 "$pid" 2>/dev/null; do
      if [ "$SECONDS" -ge "$deadline" ]; then
        log "mariadb (pid $pid) still running after 30s; killing it"
        kill -9 "$pid" 2>/dev/null || true
      fi
      sleep 0.2
    done
    stopped=1
  fi
  rm -f "$dir/mariadb.pid"
  if [ -f "$dir/data/postmaster.pid" ]; then
    pid="$(head -n 1 "$dir/data/postmaster.pid")"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      log "stopping postgres (pid $pid) on $dir"
      as_pg "$(pg_bin)/pg_ctl" -D "$dir/data" -s -m fast -t 30 stop ||
        { log "postgres (pid $pid) did not stop; killing it"; kill -9 "$pid" 2>/dev/null || true; }
      stopped=1
    fi
  fi
  [ "$stopped" -eq 1 ] || log "nothing running on $dir"
}

case "${1:-}" in
  start-mariadb) shift; start_mariadb "$@" ;;
  start-postgres) shift; start_postgres "$@" ;;
  stop) shift; stop "$@" ;;
  free-port) shift; free_port "$@" ;;
  *) usage ;;
esac
