"""One process of the multi-process test: two steps on fixed global batches.

    python multiprocess_worker.py PORT PROCESS_ID NUM_PROCESSES DEVICES_PER_PROCESS OUT.npz

Every process feeds its own rows of the same global batches; process 0 saves the variables. One
process with all the devices is the reference. Then the job claims a workdir beside OUT.npz as
one writer (writer.WriterClaim), and is refused, on every process, a workdir another job holds.
"""

import os
import sys

port, process_id, num_processes, local_devices, out = sys.argv[1:]
process_id, num_processes, local_devices = int(process_id), int(num_processes), int(local_devices)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import xla_flags  # noqa: E402  (imports no JAX)

os.environ["XLA_FLAGS"] = xla_flags(local_devices)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

if num_processes > 1:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=num_processes,
                             process_id=process_id)

from helpers import random_batch, tiny_config  # noqa: E402
from instance_loss_jax import sharding, training as ts  # noqa: E402
from test_train_step import MULTIPROCESS  # noqa: E402

config = tiny_config(**MULTIPROCESS)
step = ts.make_train_step(config, 10)  # the mesh of every device of both processes
state = ts.create_train_state(config, jax.random.key(0), 10, step.mesh)
rows = config.batch_size // num_processes
mine = slice(process_id * rows, (process_id + 1) * rows)
for s in range(2):
  batch = random_batch(config, seed=s)
  state, metrics = step(state, {k: v[mine] for k, v in batch.items()})
variables = ts.variables_of(ts.host_state(state, config))  # every process takes part
if process_id == 0:
  flat = {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(variables)}
  np.savez(out, **flat)
print("done", process_id, float(sharding.to_host(metrics)["loss"]))

import json  # noqa: E402
import time  # noqa: E402

from jax.experimental import multihost_utils  # noqa: E402
from instance_loss_jax.workdir import writer  # noqa: E402

claims = os.path.join(os.path.dirname(out), "claimed")
os.makedirs(claims, exist_ok=True)
with writer.WriterClaim(claims):
  multihost_utils.sync_global_devices("claimed")
  print("claim", process_id, os.getpid(), writer.read_claim(claims)["pid"])
  multihost_utils.sync_global_devices("read")
busy = os.path.join(os.path.dirname(out), "busy")
if process_id == 0:
  os.makedirs(busy, exist_ok=True)
  with open(os.path.join(busy, writer.CLAIM_FILE), "w") as f:
    json.dump(dict(host="another-host", pid=1, started=time.time(), heartbeat=time.time(),
                   job="other"), f)
multihost_utils.sync_global_devices("busy written")
try:
  writer.WriterClaim(busy).acquire()
  print("not refused", process_id)
except writer.WorkdirBusy as e:
  print("refused", process_id, str(e))
