#!/usr/bin/env bash
# The test command: creates or reuses .venv (VENV), installs the package with its test and torch
# extras (INSTALL_EXTRAS=test leaves PyPI's 4.6 GB PyTorch out, and the tests that compare with
# PyTorch or read .pth files skip, saying so), runs
# pytest on CPU (extra arguments go to pytest), on TEST_WORKERS processes (pytest-xdist; default:
# one per core plus one, at most 5: the flaky-store test spends most of its three minutes in the
# storage clients' back-off, and its core goes to the extra worker; TEST_WORKERS=0 runs in this
# process). Tests that share a trained
# fixture carry an xdist_group mark, so --dist loadgroup builds each fixture once; the order is
# tests/conftest.py's (longest first), not pytest-xdist's (--no-loadscope-reorder).
INSTALL_EXTRAS="${INSTALL_EXTRAS:-test,torch}" source "$(dirname "$0")/env.sh"
workers="${TEST_WORKERS:-$(n=$(( $(nproc) + 1 )); echo $(( n > 5 ? 5 : n )))}"
JAX_PLATFORMS=cpu exec "$PY" -m pytest -n "$workers" --dist loadgroup --no-loadscope-reorder "$@"
