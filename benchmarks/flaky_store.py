r"""One Stage I run of the tests' small model on gs:// (workdir and a prepared TFDS dataset), on a
healthy store and on one that fails a share of requests: seconds and requests by client.

    python benchmarks/flaky_store.py                       # healthy, then 10% refused, 2% cut
    python benchmarks/flaky_store.py --error_rate=0.05 --cut_rate=0

The storage emulator of tests/ behind tests/fault_proxy.py (seed 0), every client pointed at
the proxy (tests/gcs_emulator.client_env); the training binary on 8 CPU devices, without a
compilation cache (both runs compile alike), TensorBoard's
events on local disk (TensorFlow's GCS client cannot be pointed at the emulator). Each run ends
with the final evaluation; its rsum is printed, so a faulty run that ended otherwise shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

flags.DEFINE_float("error_rate", 0.10, "share of requests answered 503/429")
flags.DEFINE_float("cut_rate", 0.02, "share of answers cut mid-body")


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
  from instance_loss_jax.data import prepare, synthetic
  f = flags.FLAGS
  out = tempfile.mkdtemp(prefix="flaky_store_")
  data = os.path.join(out, "data")
  synthetic.generate(data, num_images=40, seed=1, image_size=40, w2v_dim=16, w2v_epochs=2)
  proc, url = launch(free_port(), "bucket")
  proxy = FaultProxy(url, seed=0)
  os.environ.update(client_env(proxy.url))
  try:
    prepare.prepare("synthetic", data, "gs://bucket/tfds", num_shards=2)
    overrides = {k: v for k, v in small_overrides(data).items()
                 if k not in ("data.json", "data.image_root")}
    overrides.update({"tensorboard_dir": os.path.join(out, "tensorboard"),
                      "data.format": "tfds", "data.tfds_data_dir": "gs://bucket/tfds",
                      "data.tfds_name": "synthetic_scenes"})
    rows = []
    for name, rates in (("healthy", (0.0, 0.0)), ("faulty", (f.error_rate, f.cut_rate))):
      proxy.set(error_rate=rates[0], cut_rate=rates[1])
      proxy.counts = {k: 0 for k in proxy.counts}
      proxy.by_client = {}
      command = [sys.executable, "-m", "instance_loss_jax.cli.train",
                 "--config=configs/demo.py:stage1", f"--workdir=gs://bucket/runs/{name}",
                 "--compile_cache=off", *flags_for(overrides)]  # both runs compile
      env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(8))
      start = time.perf_counter()
      done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            check=False)
      seconds = time.perf_counter() - start
      if done.returncode != 0:
        raise RuntimeError(f"{name}: exit {done.returncode}\n{done.stderr[-3000:]}")
      rsum = [line for line in (done.stdout + done.stderr).splitlines() if "| rsum |" in line]
      rows.append(dict(store=name, error_rate=rates[0], cut_rate=rates[1],
                       seconds=round(seconds, 1), rsum=rsum[0] if rsum else None,
                       requests=dict(proxy.counts), by_client=proxy.by_client))
      print(json.dumps(rows[-1]), flush=True)
  finally:
    proxy.close()
    proc.kill()


if __name__ == "__main__":
  app.run(main)
