#!/usr/bin/env bash
# Train on GPUs: one host with all its GPUs, or several hosts under SLURM.
#
#   bash launch/gpu.sh --config=configs/mscoco.py:stage1 --workdir=runs/coco-1 ...
#   srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 bash launch/gpu.sh ...   (multi-host)
#
# One process per host drives all of that host's GPUs (one device mesh over every GPU of every
# host; W_share split over them by class). Under SLURM with more than one
# task, JAX reads the coordinator, process count and index from the SLURM variables
# (jax.distributed.initialize()); every process feeds its own shard of the data.
INSTALL_EXTRAS=cuda source "$(dirname "$0")/env.sh"
# JAX preallocates 75% of each GPU by default. Nothing else here uses GPU memory (tf.data runs on
# TensorFlow's CPU build; the evaluation runs in JAX), so give XLA 90% and leave the rest to
# CUDA's own workspaces.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
exec "$PY" -m instance_loss_jax.cli.train "$@"
