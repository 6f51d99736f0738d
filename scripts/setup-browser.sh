#!/usr/bin/env bash
# Install what the web console's browser test needs: Debian's chromium and
# playwright-core (npm; it drives that chromium, it downloads no browser of
# its own) under $SLUICE_CACHE/browser. Idempotent. Prints KEY=VALUE lines.
source "$(dirname "$0")/common.sh"
BROWSER="$SLUICE_CACHE/browser"
apt_ensure chromium
npm_ensure "$BROWSER" playwright-core 'playwright-core@1.65.1'
echo "SLUICE_CHROMIUM=$(command -v chromium)"
echo "SLUICE_BROWSER_MODULES=$BROWSER/node_modules"
