#!/usr/bin/env bash
# The main job on the built-in synthetic dataset, on CPU: set-up if needed, data, Stage I,
# Stage II (from Stage I's checkpoint), evaluation, and the results table.
#   bash launch/demo.sh [DEMO_DIR]      (default: workdirs/demo; re-running resumes/reuses)
source "$(dirname "$0")/env.sh"
DIR="${1:-workdirs/demo}"
DATA="$DIR/data"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
start=$(date +%s)
if [ ! -f "$DATA/dataset.json" ]; then
  "$PY" -m instance_loss_jax.cli.synthetic --out="$DATA" --num_images=800 --seed=0 \
    --image_size=64 --w2v_dim=32
fi
data_flags=(--config.data.json="$DATA/dataset.json" --config.data.image_root="$DATA/images"
            --config.data.word2vec="$DATA/word2vec.bin")
"$PY" -m instance_loss_jax.cli.train --config=configs/demo.py:stage1 --workdir="$DIR/stage1" \
  "${data_flags[@]}"
"$PY" -m instance_loss_jax.cli.train --config=configs/demo.py:stage2 --workdir="$DIR/stage2" \
  --config.init_from="$DIR/stage1" "${data_flags[@]}"
latest() { ls -t "$1"/eval/test-*.json | head -n 1; }
echo
echo "Demo results (synthetic test split), $(( $(date +%s) - start ))s in all:"
"$PY" -m instance_loss_jax.cli.compare "Stage I=$(latest "$DIR/stage1")" \
  "Stage II=$(latest "$DIR/stage2")"
