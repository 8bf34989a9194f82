# Sourced by the launch scripts: create or reuse a virtual environment at the repository root
# (VENV, default .venv) and install the package into it (with the extras named in
# INSTALL_EXTRAS, e.g. "test,torch"). PYTHON picks the interpreter of a new environment; each
# Python needs its own (VENV=.venv-3.13 PYTHON=python3.13 ...): one made by another Python is
# refused, not silently reused.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VENV:-.venv}"
minor() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'; }
# Several processes on a shared file system (SLURM tasks) take turns: one installs, the others
# then find it done.
exec 9>"$ROOT/$VENV.lock"
flock 9
if [ -x "$VENV/bin/python" ]; then
  if [ -n "${PYTHON:-}" ]; then
    want="$(minor "$PYTHON")"
    have="$(minor "$VENV/bin/python")"
    if [ "$want" != "$have" ]; then
      echo "error: $VENV holds Python $have, PYTHON=$PYTHON is $want; name another" \
        "environment (VENV=.venv-$want) or remove $VENV" >&2
      exit 1
    fi
  fi
else
  # jax 0.10, flax 0.12 and orbax-checkpoint 0.12 need Python 3.11+ (Ubuntu 22.04 has 3.10);
  # TensorFlow 2.21 has no wheels past 3.13.
  PYTHON="${PYTHON:-$(for p in python3 python3.13 python3.12 python3.11; do
    command -v "$p" >/dev/null && "$p" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info < (3, 14))' \
      && echo "$p" && break; done || true)}"
  if [ -z "$PYTHON" ]; then
    echo "error: no Python 3.11 to 3.13 found (jax 0.10 needs 3.11, TensorFlow 2.21 stops at" \
      "3.13); set PYTHON=/path/to/python3.11" >&2
    exit 1
  fi
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
spec="."
[ -n "${INSTALL_EXTRAS:-}" ] && spec=".[${INSTALL_EXTRAS}]"
# The package is installed editable: code changes need no reinstall, only what setup.cfg and
# pyproject.toml say (dependencies, entry points) and the extras. Skip pip when those are what
# the environment was last installed with.
stamp="$VENV/.installed-from"
installed="$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1) [${INSTALL_EXTRAS:-}]"
if [ "$(cat "$stamp" 2>/dev/null)" != "$installed" ]; then
  # (setuptools warns that an editable install is one, on every install: not news here.)
  PYTHONWARNINGS=ignore "$VENV/bin/python" -m pip install -q -e "$spec"
  echo "$installed" > "$stamp"
fi
flock -u 9
exec 9>&-
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
PY="$ROOT/$VENV/bin/python"
