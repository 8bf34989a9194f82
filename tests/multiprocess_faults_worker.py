"""One process of the two-process storage-fault test (tests/test_storage_faults.py):

    python multiprocess_faults_worker.py PORT PROCESS_ID WORKDIR

The two processes (one device each) save checkpoints 4 and 8 of a train state (tiny_config's
model, random values drawn from the step's number, W_share split over the two devices).
Process 0 then truncates the data files that process 1 wrote into checkpoint 8: process 1
cannot read its shards there, process 0 can read its own. The trainer's resume
(`resume.initial_state`, with no step compiled) must then take step 4 on both processes,
whole. Prints `resumed STEP OK`.
"""

import logging
import os
import sys

port, process_id, workdir = sys.argv[1:]
process_id = int(process_id)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import xla_flags  # noqa: E402  (imports no JAX)

os.environ["XLA_FLAGS"] = xla_flags(1)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

from jax.experimental import multihost_utils  # noqa: E402

from helpers import tiny_config  # noqa: E402
from instance_loss_jax import resume, sharding, trainer, training  # noqa: E402
from instance_loss_jax.workdir import checkpoint  # noqa: E402
from test_storage_faults import damage  # noqa: E402

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
STEPS_PER_EPOCH = 10
# W_share's shard on each device (128 x 8 classes, 4 KiB) over OCDBT's 1 KiB inline limit: in
# a data file of the process that wrote it, not a value inside the shared B-tree nodes.
config = tiny_config(**{"model.embed_dim": 128})
mesh = sharding.make_mesh()
template = training.abstract_train_state(config, STEPS_PER_EPOCH, mesh)
meta = checkpoint.run_meta(config, "vocabulary")


def values(step, s):
  """Step `step`'s values of a leaf: random floats (constants would compress into the B-tree
  nodes, below the inline limit), the step itself for counters."""
  if np.issubdtype(s.dtype, np.integer):
    return np.full(s.shape, step, s.dtype)
  return np.random.default_rng(step).normal(size=s.shape).astype(s.dtype)


def filled(step):
  """The template as global arrays of step's values (each process makes its shards)."""
  return jax.tree_util.tree_map(lambda s: jax.make_array_from_callback(
      s.shape, s.sharding, lambda index: values(step, s)[index]), template)


mgr = checkpoint.manager(workdir)
for step in (4, 8):
  checkpoint.save(mgr, step, filled(step), meta)
  checkpoint.finish(mgr)
if process_id == 0:
  damage(workdir, 8, "truncated", writer=1)
multihost_utils.sync_global_devices("damaged")
state, start = resume.initial_state(config, workdir, mgr, None, meta, None, STEPS_PER_EPOCH,
                                     mesh)
whole = all(np.array_equal(np.asarray(shard.data), values(start, s)[shard.index])
            for leaf, s in zip(jax.tree_util.tree_leaves(state),
                               jax.tree_util.tree_leaves(template))
            for shard in leaf.addressable_shards)
print("resumed", start, "OK" if whole else "WRONG", flush=True)
