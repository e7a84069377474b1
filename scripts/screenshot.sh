#!/usr/bin/env bash
# Render a report page in headless Chromium and save a PNG, to look at what a reader sees.
#   scripts/screenshot.sh reports/notebooks/02_transfer_resnet34.html /tmp/page.png [height]
# Needs Debian's chromium (apt-get install chromium). Network stays off: the page must be self-contained.
set -euo pipefail
page=$(readlink -f "$1"); out=${2:-/tmp/page.png}; height=${3:-3000}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$browser" ] || { echo "no chromium found: apt-get install chromium"; exit 2; }
profile=$(mktemp -d)
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars \
  --window-size=1280,"$height" --screenshot="$out" "file://$page" 2>/dev/null
rm -rf "$profile"
echo "$out"
