"""One process of the two-process storage-fault test (tests/test_storage_faults.py):

    python multiprocess_faults_worker.py PORT PROCESS_ID DATA_DIR OUT_DIR

The two processes train test_storage_faults' run from start to end in OUT_DIR/straight. Process
0 then copies it to OUT_DIR/damaged and truncates the data files that process 1 wrote into the
newest checkpoint: process 1 cannot read its shards there, process 0 can read its own. The same
run resumed in OUT_DIR/damaged must go on, on both processes, from the step before, and end
with the straight run's variables. Prints `same` or `different KEY` (process 0).
"""

import logging
import os
import shutil
import sys

port, process_id, data_dir, out_dir = sys.argv[1:]
process_id = int(process_id)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import xla_flags  # noqa: E402  (imports no JAX)

os.environ["XLA_FLAGS"] = xla_flags(1)  # one device per process: the fastest to compile
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

from jax.experimental import multihost_utils  # noqa: E402

from instance_loss_jax import checkpoint, trainer  # noqa: E402
from test_storage_faults import OVERRIDES, STEPS, final_variables  # noqa: E402
from test_training import small_config  # noqa: E402

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
# W_share's shard on each device (128 x 16 classes, 8 KiB) over OCDBT's 1 KiB inline limit: in
# a data file of the process that wrote it, not a value inside the shared B-tree nodes.
config = small_config("stage1", data_dir, **OVERRIDES, **{"model.embed_dim": 128})
straight, damaged = os.path.join(out_dir, "straight"), os.path.join(out_dir, "damaged")
trainer.train_and_evaluate(config, straight)
if process_id == 0:
  shutil.copytree(straight, damaged)
  state = os.path.join(damaged, checkpoint.CHECKPOINT_DIR, str(STEPS), "state")
  data = [os.path.join(root, f) for root, _, files in os.walk(state) for f in files
          if os.path.basename(root) == "d" and "process_1" in root]
  assert data, sorted(os.walk(state))
  for path in data:
    os.truncate(path, os.path.getsize(path) // 2)
  print("damaged", len(data), flush=True)
multihost_utils.sync_global_devices("damaged")
trainer.train_and_evaluate(config, damaged)
ended, expected = final_variables(damaged), final_variables(straight)
if process_id == 0:
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(ended),
                          jax.tree_util.tree_leaves(expected)):
    if not np.array_equal(x, y):
      print("different", jax.tree_util.keystr(path), flush=True)
      break
  else:
    print("same", flush=True)
print("done", process_id, flush=True)
