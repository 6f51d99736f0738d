#!/usr/bin/env bash
# Install the official Segment SDKs the compatibility tests drive:
# segment-analytics-python (PyPI) in a venv and @segment/analytics-node (npm),
# under $SLUICE_CACHE/compat. Idempotent. Prints KEY=VALUE lines for the tests.
source "$(dirname "$0")/common.sh"
COMPAT="$SLUICE_CACHE/compat"
mkdir -p "$COMPAT"
command -v python3 >/dev/null || apt_ensure python3 python3-venv
if ! "$COMPAT/venv/bin/python" -c 'import segment.analytics' 2>/dev/null; then
  log "installing segment-analytics-python into $COMPAT/venv"
  python3 -m venv "$COMPAT/venv" >&2 || { apt_ensure python3-venv; python3 -m venv "$COMPAT/venv" >&2; }
  "$COMPAT/venv/bin/pip" install -q 'segment-analytics-python>=2.3,<3' >&2
fi
npm_ensure "$COMPAT/node" @segment/analytics-node '@segment/analytics-node@^3'
echo "SLUICE_PYTHON=$COMPAT/venv/bin/python"
echo "SLUICE_NODE_MODULES=$COMPAT/node/node_modules"
