#!/usr/bin/env bash
# Install what the web console's browser test needs: Debian's chromium and
# playwright-core (npm; it drives that chromium, it downloads no browser of
# its own) under $SLUICE_CACHE/browser. Idempotent. Prints KEY=VALUE lines.
source "$(dirname "$0")/common.sh"
BROWSER="$SLUICE_CACHE/browser"
apt_ensure chromium
command -v node >/dev/null || apt_ensure nodejs npm
if [ ! -f "$BROWSER/node_modules/playwright-core/package.json" ]; then
  log "installing playwright-core into $BROWSER"
  mkdir -p "$BROWSER"
  (cd "$BROWSER" && { [ -f package.json ] || npm init -y >/dev/null; } && npm install --silent --no-fund --no-audit 'playwright-core@1.65.1' >&2)
fi
echo "SLUICE_CHROMIUM=$(command -v chromium)"
echo "SLUICE_BROWSER_MODULES=$BROWSER/node_modules"
