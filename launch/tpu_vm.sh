#!/usr/bin/env bash
# Train on a Cloud TPU VM (single host or pod slice): create or reuse the VM, copy this checkout
# to every worker, install with the `tpu` extra, and run the same command on all workers (JAX
# finds its peers on a TPU VM by itself; each worker feeds its own shard of the data).
#
#   TPU_NAME=il-v4 ZONE=us-central2-b ACCELERATOR=v4-32 \
#     bash launch/tpu_vm.sh --config=configs/flickr30k.py:stage1 --workdir=gs://BUCKET/f30k-1 \
#       --config.data.json=/data/dataset_flickr30k.json ...
#
# Data and word2vec files must be readable on every worker at the same path (a mounted disk or
# gs:// paths that TensorFlow reads). Nothing is downloaded by the training itself.
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
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  set -e; mkdir -p $REMOTE_DIR && tar -xzf src.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q -e '.[tpu]'
  .venv/bin/python -m instance_loss_jax.train $args"
