"""One device mesh for training: global arrays, W_share sharded over its classes.

The train step is `jax.jit(jax.shard_map(per_device_step))` over a 1-d `Mesh` of every device of
every process, axis `AXIS`. That is what `jax.pmap` itself is built from since JAX 0.8; written
out, the per-device program stays the same (BatchNorm synced over AXIS, features all-gathered),
while the state becomes global `jax.Array`s with `NamedSharding`s, so:

- W_share (kernel [D, C], bias [C]) and its momentum can be split over the classes: each device
  holds a contiguous slice of C / devices classes (`model.w_share_sharding="classes"`);
- everything else is replicated (PartitionSpec()), the batch is split over its first axis;
- Orbax saves the global arrays, each process writing the shards it holds, and restores them
  onto any mesh.

The class count is padded up to a multiple of the device count; padded classes are zero, never
win the softmax and never get a gradient (see `losses.instance_loss_per_row`).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "batch"
W_SHARE = "w_share"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-d mesh (axis AXIS) of `devices` (default: every device of every process, in JAX's
  order, which keeps each process's devices together)."""
  return Mesh(np.array(list(devices if devices is not None else jax.devices())), (AXIS,))


def classes_sharded(config) -> bool:
  return config.model.w_share_sharding == "classes"


def padded_num_classes(config, mesh: Mesh) -> int:
  """W_share's width on `mesh`: num_classes rounded up to a multiple of the device count when
  its classes are sharded (every device holds the same number), else num_classes."""
  n = mesh.size if classes_sharded(config) else 1
  return -(-config.num_classes // n) * n


def is_w_share(path) -> bool:
  """Whether a tree path (jax.tree_util key path) lies under W_share."""
  return any(getattr(k, "key", getattr(k, "name", None)) == W_SHARE for k in path)


def _spec(path, leaf, sharded: bool) -> P:
  """W_share's leaves (parameters and any optimiser state shaped like them) split along their
  last axis, the class axis; every other leaf replicated."""
  if sharded and is_w_share(path) and getattr(leaf, "ndim", 0) >= 1:
    return P(*([None] * (leaf.ndim - 1)), AXIS)
  return P()


def partition_specs(tree, config):
  """A tree of PartitionSpecs like `tree` (a TrainState or a variables dict)."""
  sharded = classes_sharded(config)
  return jax.tree_util.tree_map_with_path(lambda p, x: _spec(p, x, sharded), tree)


def shardings(tree, config, mesh: Mesh):
  """NamedShardings on `mesh` for every leaf of `tree`."""
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), partition_specs(tree, config))


def pad_classes(tree, num_padded: int):
  """W_share's leaves widened with zeros (or cut) to `num_padded` classes on their last axis.

  Works on numpy or jax arrays and ShapeDtypeStructs; other leaves are returned as they are.
  """
  def pad(path, x):
    if not is_w_share(path) or getattr(x, "ndim", 0) < 1 or x.shape[-1] == num_padded:
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape[:-1] + (num_padded,), x.dtype, sharding=x.sharding)
    xp = jnp if isinstance(x, jax.Array) else np
    if x.shape[-1] > num_padded:
      return x[..., :num_padded]
    return xp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, num_padded - x.shape[-1])])

  return jax.tree_util.tree_map_with_path(pad, tree)


def place(tree, target_shardings):
  """Puts a tree of host arrays (every process holding the same values) or jax.Arrays onto
  `target_shardings` as global arrays; each process builds only the shards it holds."""
  def put(x, sharding):
    if isinstance(x, jax.Array) and (x.sharding == sharding or not x.is_fully_addressable):
      return jax.device_put(x, sharding)  # already global: kept, or resharded
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree_util.tree_map(put, tree, target_shardings)


def global_batch(local_batch: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of the batch (numpy, [rows_of_this_process, ...]) as global arrays
  split over AXIS: process p's rows come after those of processes < p."""
  sharding = NamedSharding(mesh, P(AXIS))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def to_host(tree):
  """Global arrays as numpy arrays holding the whole value, on every process."""
  def get(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
      return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree_util.tree_map(get, tree)
