#!/usr/bin/env bash
# The figures one short accelerator lease (about 10 minutes on one GPU or a TPU VM) is for,
# cheapest first, each printed as soon as it is measured (benchmarks/device_check.py says which):
# Stage II bfloat16 at 32 per device, then at the largest batch that fits, Stage I with device
# prefetch 0 and 2, then float32 and the W_share sweep while time remains.
#
#   bash benchmarks/device_check.sh prepare    # here, with network: the wheels the image lacks
#   bash benchmarks/device_check.sh            # on the device machine (BUDGET_S, default 480)
#   bash benchmarks/device_check.sh --dry_run  # CPU, the tests' tiny model
#
# The device image has jax, flax, optax and Orbax but neither TensorFlow (nothing here imports
# it) nor ml_collections and absl-py: their pure-Python wheels, fetched by `prepare` into
# $WHEELS (default .device_wheels, git-ignored; carry it to the device), are put on the path as
# they are (Python imports a pure wheel from its zip), so nothing is installed there. A module
# still missing is named before anything runs.
# Compiles go through JAX's persistent cache in $CACHE (default /tmp/instance_loss_jax_cache,
# outside $OUT so it does not travel back): a rerun on the same warm machine skips them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS:-.device_wheels}"
OUT="${OUT:-benchmarks/device_results}"
if [[ "${1:-}" == prepare ]]; then
  "$PYTHON" -m pip download --no-deps --only-binary=:all: -d "$WHEELS" ml-collections absl-py
  exit
fi
export JAX_COMPILATION_CACHE_DIR="${CACHE:-/tmp/instance_loss_jax_cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-1}"
export TF_CPP_MIN_LOG_LEVEL=2
# Each module the image lacks comes from its wheel in $WHEELS (and only those: a wheel put first
# on the path would shadow an installed version).
found=$(WHEELS="$WHEELS" "$PYTHON" - <<'PY'
import glob, importlib.util, os
wheels = {"ml_collections": "ml_collections-*.whl", "absl": "absl_py-*.whl"}
path, missing = [], []
for module in ("jax", "flax", "optax", "orbax", "numpy", "yaml", "ml_collections", "absl"):
  if importlib.util.find_spec(module) is not None:
    continue
  wheel = sorted(glob.glob(os.path.join(os.environ["WHEELS"], wheels.get(module, "-"))))
  (path if wheel else missing).append(os.path.abspath(wheel[-1]) if wheel else module)
print(":".join(path) + "|" + " ".join(missing))
PY
)
wheel_path="${found%%|*}" missing="${found#*|}"
if [[ -n "$missing" ]]; then
  echo "device_check.sh: this Python lacks: $missing (run 'bash benchmarks/device_check.sh" \
       "prepare' here and carry $WHEELS, or install them)" >&2
  exit 2
fi
if [[ -n "$wheel_path" ]]; then
  echo "device_check.sh: from $WHEELS: $wheel_path" >&2
  wheel_path=":$wheel_path"
fi
export PYTHONPATH="$PWD$wheel_path${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" benchmarks/device_check.py --budget_s="${BUDGET_S:-480}" --out="$OUT" "$@"
