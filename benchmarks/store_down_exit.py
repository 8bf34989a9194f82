r"""How long a Stage I run on gs:// takes to end once the store goes down: the seconds from the
store going down (every request answered 503) to the binary's exit, for each step at which it
goes down.

    python benchmarks/store_down_exit.py --down_at=2,4,5,6

The storage emulator of tests/ behind tests/fault_proxy.py; the training binary (one CPU
device, the tests' small model, a checkpoint every 4 steps, a log line every step,
storage_retry_s=6) on a gs:// workdir; the proxy goes down once the run has logged step K. At
K=5 the asynchronous save of step 4 is usually still in flight. Prints one JSON line per K:
seconds, exit status, the run's last line, and requests by client.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

flags.DEFINE_list("down_at", ["2", "5"], "steps after whose log line the store goes down")
_STEP = re.compile(r"\] step (\d+)/")


def main(argv):
  del argv
  # Read once per process by etils, google-auth and gcsfs: set before any of them loads.
  os.environ.update({"EPATH_USE_TF": "false", "NO_GCE_CHECK": "true",
                     "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"})
  # pylint: disable=g-import-not-at-top
  from fault_proxy import FaultProxy
  from gcs_emulator import client_env, launch
  from helpers import free_port, xla_flags
  from test_training import flags_for, small_overrides
  from instance_loss_jax.data import synthetic
  out = tempfile.mkdtemp(prefix="store_down_")
  data = os.path.join(out, "data")
  synthetic.generate(data, num_images=40, seed=1, image_size=40, w2v_dim=16, w2v_epochs=2)
  overrides = {**small_overrides(data, epochs=10), "log_every": 1, "eval.at_end": False,
               "storage_retry_s": 6.0, "tensorboard_dir": os.path.join(out, "tensorboard")}
  for k in (int(s) for s in flags.FLAGS.down_at):
    proc, url = launch(free_port(), "bucket")
    proxy = FaultProxy(url, seed=0)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1), **client_env(proxy.url))
    run = subprocess.Popen(
        [sys.executable, "-m", "instance_loss_jax.cli.train", "--config=configs/demo.py:stage1",
         f"--workdir=gs://bucket/runs/down{k}", *flags_for(overrides)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = []
    reader = threading.Thread(target=lambda: err.extend(iter(run.stderr.readline, "")))
    reader.start()
    while run.poll() is None:
      steps = [int(m.group(1)) for m in map(_STEP.search, list(err)) if m]
      if steps and steps[-1] >= k:
        proxy.set(down=True)
        break
      time.sleep(0.01)
    down = time.perf_counter()
    run.wait()
    seconds = time.perf_counter() - down
    reader.join()
    last = [line for line in err if line.startswith(("error:", "preempted:"))]
    print(json.dumps(dict(down_at_step=k, seconds_to_exit=round(seconds, 1),
                          exit_status=run.returncode, line=last[-1].strip() if last else None,
                          by_client=proxy.by_client)), flush=True)
    proxy.close()
    proc.kill()


if __name__ == "__main__":
  app.run(main)
