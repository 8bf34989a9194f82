#!/usr/bin/env bash
# Train on a Cloud TPU VM (single host or pod slice): create or reuse the VM, copy this checkout
# to every worker, install with the `tpu` extra, and run the same command on all workers (JAX
# finds its peers through the TPU VM's metadata server, asked for by --distributed; each worker
# feeds its own shard of the data).
#
#   TPU_NAME=il-v4 ZONE=us-central2-b ACCELERATOR=v4-32 \
#     bash launch/tpu_vm.sh --config=configs/flickr30k.py:stage1 --workdir=gs://BUCKET/f30k-1 \
#       --config.data.tfds_data_dir=gs://BUCKET/tfds --config.data.word2vec=gs://BUCKET/w2v.bin
#
# The dataset prepared once (`python -m instance_loss_jax.cli.prepare`, docs/data.md): each
# worker reads its own images by record number from gs://. Data and word2vec files must be
# readable on every worker at the same path. Nothing is downloaded by the training itself.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR="${ACCELERATOR:-v4-8}"
VERSION="${TPU_SOFTWARE_VERSION:-tpu-ubuntu2204-base}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
REMOTE_DIR="instance_loss_jax"

if ! gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
    --accelerator-type="$ACCELERATOR" --version="$VERSION"
fi
tarball="$(mktemp -d)/src.tar.gz"
git -C "$ROOT" archive --format=tar.gz -o "$tarball" HEAD
gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME":src.tar.gz --zone="$ZONE" --worker=all
args=$(printf '%q ' "$@")
# jax, flax and orbax need Python >= 3.11; the TPU VM images ship Ubuntu 22.04's Python 3.10
# (README: "Cloud TPU VM"). Use a python3.11+ found on the VM, else install Ubuntu's python3.11,
# else a standalone build through uv.
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  set -e; mkdir -p $REMOTE_DIR && tar -xzf src.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR
  if [ ! -x .venv/bin/python ]; then
    PY=\$(for p in python3 python3.13 python3.12 python3.11; do
      command -v \$p >/dev/null && \$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        && echo \$p && break; done || true)
    if [ -z \"\$PY\" ]; then
      sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv \
        && PY=python3.11 || true
    fi
    if [ -z \"\$PY\" ]; then
      python3 -m pip install -q --user uv && ~/.local/bin/uv python install 3.11
      PY=\$(~/.local/bin/uv python find 3.11)
    fi
    \$PY -m venv .venv
  fi
  .venv/bin/pip install -q -e '.[tpu]'
  .venv/bin/python -m instance_loss_jax.cli.train --distributed $args"
