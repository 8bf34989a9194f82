#!/usr/bin/env bash
# Rebuilds docs/search/: an index of the demo's test images, one text query as an HTML page,
# and its screenshot by headless Chromium (Debian's `chromium` package).
#   bash docs/search/make_screenshot.sh [DEMO_DIR]     (after launch/demo.sh; default workdirs/demo)
set -euo pipefail
source "$(dirname "$0")/../../launch/env.sh"
DIR="${1:-workdirs/demo}"
OUT=docs/search
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
"$PY" -m instance_loss_jax.cli.export --workdir="$DIR/stage2" --split=test --out="$DIR/test.index"
QUERY="two big blue circles and a small orange circle"
"$PY" -m instance_loss_jax.cli.search --index="$DIR/test.index" --query="$QUERY" --k=8 \
  --html="$OUT/search.html" | tee "$OUT/search.txt"
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=900,620 \
  --screenshot="$OUT/search.png" "file://$ROOT/$OUT/search.html"
echo "wrote $OUT/search.html, $OUT/search.txt, $OUT/search.png"
