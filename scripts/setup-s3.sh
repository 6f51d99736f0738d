#!/usr/bin/env bash
# Install the local S3-compatible server the S3 archive tests start: moto's
# server mode (moto[server], PyPI), and pyarrow, in the compatibility venv
# $SLUICE_CACHE/compat/venv. The tests start it themselves
# (`moto_server -H 127.0.0.1 -p <port>`) and stop it when they end.
# Idempotent. Prints KEY=VALUE lines for the tests.
source "$(dirname "$0")/common.sh"
VENV="$SLUICE_CACHE/compat/venv"
command -v python3 >/dev/null || apt_ensure python3 python3-venv
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  python3 -m venv "$VENV" >&2 || { apt_ensure python3-venv; python3 -m venv "$VENV" >&2; }
fi
if ! "$VENV/bin/python" -c 'import moto.server, flask, flask_cors' 2>/dev/null || [ ! -x "$VENV/bin/moto_server" ]; then
  log "installing moto[server] into $VENV"
  "$VENV/bin/pip" install -q 'moto[server]>=5,<6' >&2
fi
# pyarrow: the independent reader the s3 destination's Parquet test reads back with.
if ! "$VENV/bin/python" -c 'import pyarrow.parquet' 2>/dev/null; then
  log "installing pyarrow into $VENV"
  "$VENV/bin/pip" install -q 'pyarrow>=14' >&2
fi
echo "SLUICE_MOTO_SERVER=$VENV/bin/moto_server"
