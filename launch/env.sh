# Sourced by the launch scripts: create or reuse .venv at the repository root and install the
# package into it (with the extras named in INSTALL_EXTRAS, e.g. "test").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# Several processes on a shared file system (SLURM tasks) take turns: one installs, the others
# then find it done.
exec 9>"$ROOT/.venv.lock"
flock 9
if [ ! -x .venv/bin/python ]; then
  # jax 0.10, flax 0.12 and orbax-checkpoint 0.12 need Python 3.11+ (Ubuntu 22.04 has 3.10).
  PYTHON="${PYTHON:-$(for p in python3 python3.13 python3.12 python3.11; do
    command -v "$p" >/dev/null && "$p" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
      && echo "$p" && break; done || true)}"
  if [ -z "$PYTHON" ]; then
    echo "error: no Python 3.11 or later found (jax 0.10 needs it);" \
      "set PYTHON=/path/to/python3.11" >&2
    exit 1
  fi
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
spec="."
[ -n "${INSTALL_EXTRAS:-}" ] && spec=".[${INSTALL_EXTRAS}]"
.venv/bin/python -m pip install -q -e "$spec"
flock -u 9
exec 9>&-
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
PY="$ROOT/.venv/bin/python"
