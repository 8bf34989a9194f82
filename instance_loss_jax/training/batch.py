"""A host batch against the config: checked before anything compiles, or described as shapes."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from instance_loss_jax import sharding
from instance_loss_jax.config import uses_mined_negatives
from instance_loss_jax.errors import BatchError


def check_batch(batch: dict[str, Any], config: ml_collections.ConfigDict, mesh) -> None:
  """Raises BatchError naming every field that does not fit (before anything compiles).

  `batch` is this process's rows of the global batch, as numpy arrays without a device axis.
  """
  problems = []
  size, length = config.image_size, config.model.text.max_len
  processes, devices = jax.process_count(), mesh.size
  rows = config.batch_size // processes
  expected = {"images": (rows, size, size, 3), "tokens": (rows, length), "labels": (rows,)}
  if uses_mined_negatives(config):
    k = config.loss.num_mined // processes
    expected.update(mined_tokens=(k, length), mined_labels=(k,))
    if config.loss.num_mined % devices:
      problems.append(f"loss.num_mined={config.loss.num_mined} is not divisible by "
                      f"{devices} devices")
  if config.batch_size % devices:
    problems.append(f"batch_size={config.batch_size} is not divisible by {devices} devices")
  for name, shape in expected.items():
    if name not in batch:
      problems.append(f"missing '{name}' (expected shape {shape})")
      continue
    got = tuple(np.shape(batch[name]))
    if got != shape:
      hint = (f" (model.text.max_len={length})" if name.endswith("tokens") and
              got[:-1] == shape[:-1] else "")
      problems.append(f"'{name}' has shape {got}, expected {shape}{hint}")
    if name != "images" and not jnp.issubdtype(batch[name].dtype, jnp.integer):
      problems.append(f"'{name}' has dtype {batch[name].dtype}, expected integers")
  if not problems:
    for name, bound, key in (("tokens", config.model.text.vocab_size, "model.text.vocab_size"),
                             ("labels", config.num_classes, "num_classes")):
      lo, hi = int(np.min(batch[name])), int(np.max(batch[name]))
      if lo < 0 or hi >= bound:
        problems.append(f"'{name}' values span [{lo}, {hi}], outside [0, {bound}) ({key})")
  if problems:
    raise BatchError("batch does not fit the config: " + "; ".join(problems))


def abstract_batch(config: ml_collections.ConfigDict, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch as shapes with the step's input sharding (for lowering without data)."""
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.AXIS))
  n, size, length = config.batch_size, config.image_size, config.model.text.max_len
  shapes = dict(images=((n, size, size, 3), jnp.float32), tokens=((n, length), jnp.int32),
                labels=((n,), jnp.int32))
  if uses_mined_negatives(config):
    shapes.update(mined_tokens=((config.loss.num_mined, length), jnp.int32),
                  mined_labels=((config.loss.num_mined,), jnp.int32))
  return {k: jax.ShapeDtypeStruct(s, d, sharding=spec) for k, (s, d) in shapes.items()}
