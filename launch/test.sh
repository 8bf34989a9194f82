#!/usr/bin/env bash
# The test command: creates or reuses .venv, installs the package with its test extra, runs
# pytest on CPU (extra arguments go to pytest).
INSTALL_EXTRAS=test source "$(dirname "$0")/env.sh"
JAX_PLATFORMS=cpu exec "$PY" -m pytest "$@"
