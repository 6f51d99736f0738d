#!/usr/bin/env bash
# Install what the browser tests need: Debian's chromium, playwright-core
# (npm; it drives that chromium, it downloads no browser of its own) and
# Segment's analytics.js (@segment/analytics-next, npm, for the SDK
# compatibility test) under $SLUICE_CACHE/browser. Idempotent. Prints
# KEY=VALUE lines.
source "$(dirname "$0")/common.sh"
BROWSER="$SLUICE_CACHE/browser"
apt_ensure chromium
npm_ensure "$BROWSER" playwright-core 'playwright-core@1.65.1'
npm_ensure "$BROWSER" @segment/analytics-next '@segment/analytics-next@1.84.3'
echo "SLUICE_CHROMIUM=$(command -v chromium)"
echo "SLUICE_BROWSER_MODULES=$BROWSER/node_modules"
