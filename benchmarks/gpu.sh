#!/usr/bin/env bash
# The performance figures on a GPU host, in one go (a few minutes on one H100/H200 class GPU;
# for a lease of ~10 minutes, benchmarks/device_check.sh, which compiles far less):
#   0. The full-size Stage I step on one GPU, its batches placed ahead (data.device_prefetch=2)
#      or when each step starts (0): step time, TFLOP/s and MFU.
#   1. Stage I and Stage II train steps, float32 and bfloat16, batch 32 per GPU, with XLA's
#      FLOP count and the model FLOPs utilisation; PyTorch eager on the same GPU beside them
#      when this Python's torch has CUDA (with the same-weights loss check).
#   2. W_share at 29,783 / 113,287 / 1,000,000 classes (Stage II, both dtypes): step time,
#      XLA's per-device memory, the allocator's peak, W_share's own share.
# Tables go to stdout and, as JSON and markdown, to $OUT (default benchmarks/gpu_results).
#
#   bash benchmarks/gpu.sh                 # with jax[cuda] installed in $PYTHON's environment
#   PYTHON=.venv/bin/python OUT=/tmp/gpu bash benchmarks/gpu.sh
#   STAGES=2 CHECK=0 bash benchmarks/gpu.sh   # Stage II and the sweep only, no loss check
# Installing is not part of this script (GPU machines often have no network): install the
# package with its `cuda` extra first, e.g. `pip install -e '.[cuda,test,torch]'`
# (torch: the PyTorch eager column; PyPI's Linux wheel has CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
OUT="${OUT:-benchmarks/gpu_results}"
PER_GPU_BATCH="${PER_GPU_BATCH:-32}"
STEPS="${STEPS:-10}"
# Each full-size step compiles in one to several minutes on a GPU host (RESULTS.md, "GPU: one
# H200"): STAGES=2 and CHECK=0 fit a short lease to what is still unmeasured.
STAGES="${STAGES:-1,2}"
CHECK="${CHECK:-1}"
check_flag=--check
[[ "$CHECK" == 1 ]] || check_flag=--no-check
mkdir -p "$OUT"
export TF_CPP_MIN_LOG_LEVEL=2

num_gpus=$("$PYTHON" - <<'EOF'
import sys
import jax
devices = jax.local_devices()
if devices[0].platform != "gpu":
    sys.exit(f"benchmarks/gpu.sh: JAX sees {devices[0].platform} devices, not GPUs "
             "(install the package with the 'cuda' extra)")
print(len(devices))
EOF
)
batch=$(( PER_GPU_BATCH * num_gpus ))
reference=none
if "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  reference=torch
fi
echo "== $num_gpus GPU(s), global batch $batch, PyTorch reference: $reference"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

echo "== 0. Stage I with batches placed ahead (data.device_prefetch 2) and not (0)"
"$PYTHON" benchmarks/device_prefetch.py --model=full --dtype=bfloat16 --input_ms=0 \
  --batch_size="$PER_GPU_BATCH" --steps="$STEPS" --read_every=1,50 \
  | tee "$OUT/device_prefetch.md"

echo "== 1. train step, float32 and bfloat16"
"$PYTHON" benchmarks/step_speed.py --stages="$STAGES" --dtypes=float32,bfloat16 \
  --batch_size="$batch" --warmup=3 --steps="$STEPS" --reference="$reference" "$check_flag" \
  --json="$OUT/train_step.json" | tee "$OUT/train_step.md"

echo "== 2. W_share classes"
"$PYTHON" benchmarks/step_speed.py --stages=2 --dtypes=bfloat16,float32 \
  --num_classes=29783,113287,1000000 --batch_size="$batch" --warmup=2 --steps="$STEPS" \
  --reference=none --json="$OUT/classes.json" | tee "$OUT/classes.md"
echo "== results in $OUT"
