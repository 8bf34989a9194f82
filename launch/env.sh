# Sourced by the launch scripts: create or reuse .venv at the repository root and install the
# package into it (with the extras named in INSTALL_EXTRAS, e.g. "test").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
spec="."
[ -n "${INSTALL_EXTRAS:-}" ] && spec=".[${INSTALL_EXTRAS}]"
.venv/bin/python -m pip install -q -e "$spec"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
PY="$ROOT/.venv/bin/python"
