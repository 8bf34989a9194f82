"""gs:// when the store fails now and then (tests/fault_proxy.py in front of the emulator): 10% of
requests answered 503/429 and 2% of answers cut mid-body. Every client in our path retries on
its own (docs/training.md, "Storage and preemption faults"); these tests hold the run to the
same end as on local disk, through a SIGTERM and a resume, and the index binaries to reading it.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from instance_loss_jax import trainer
from instance_loss_jax.workdir import checkpoint

from fault_proxy import FaultProxy
from gcs_emulator import client_env, launch
from helpers import free_port, xla_flags
from test_training import (  # noqa: F401  (data_dir: a fixture)
    ROOT, data_dir, flags_for, small_config, small_overrides)

pytestmark = pytest.mark.slow
BUCKET = "flaky"
_STEP_LOGGED = re.compile(r"\] step (\d+)/")


@pytest.fixture(scope="module")
def flaky():
  """The emulator behind a fault proxy (healthy until a test sets its rates), this process's
  and its children's clients pointed at the proxy."""
  pytest.importorskip("gcsfs")
  proc, url = launch(free_port(), BUCKET)
  proxy = FaultProxy(url, seed=0)
  env = client_env(proxy.url)
  with pytest.MonkeyPatch.context() as patch:  # this process's environment, then restored
    for name, value in env.items():
      patch.setenv(name, value)
    yield proxy
  proxy.close()
  proc.terminate()
  proc.wait(timeout=30)


def _binary(module, args, stop_at_step=None, devices=8):
  """Runs one of the binaries; with `stop_at_step`, SIGTERM once it has logged that step.
  Returns (returncode, stdout, stderr)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices))
  proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  err, out = [], []
  readers = [threading.Thread(target=lambda s=s, into=into: into.extend(iter(s.readline, "")))
             for s, into in ((proc.stderr, err), (proc.stdout, out))]
  for reader in readers:
    reader.start()
  if stop_at_step is not None:
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
      logged = [int(m.group(1)) for m in map(_STEP_LOGGED.search, list(err)) if m]
      if logged and logged[-1] >= stop_at_step:
        proc.send_signal(signal.SIGTERM)
        break
      time.sleep(0.01)
  proc.wait(timeout=900)
  for reader in readers:
    reader.join()
  return proc.returncode, "".join(out), "".join(err)


def test_a_run_on_a_failing_store_ends_as_on_local_disk_through_a_sigterm(flaky, data_dir,
                                                                          tmp_path):
  from instance_loss_jax.data import prepare  # pylint: disable=g-import-not-at-top  (TFDS)
  store = f"gs://{BUCKET}"
  prepare.prepare("synthetic", data_dir, f"{store}/tfds", num_shards=2)
  # The reference: the same Stage I on local disk, from the image folder (a prepared TFDS
  # dataset trains the same, bit for bit: test_training.py).
  # Eight devices here and in the binaries: bit for bit needs the same programs (XLA:CPU's
  # arithmetic differs with the process's device count, even on a one-device mesh).
  local = str(tmp_path / "local")
  reference = trainer.train_and_evaluate(small_config("stage1", data_dir), local)

  flaky.set(error_rate=0.10, cut_rate=0.02)
  before = dict(flaky.counts)
  overrides = {k: v for k, v in small_overrides(data_dir).items()
               if k not in ("data.json", "data.image_root")}
  overrides.update({"data.format": "tfds", "data.tfds_data_dir": f"{store}/tfds",
                    "data.tfds_name": "synthetic_scenes",
                    # TensorFlow's GCS client cannot be pointed at the emulator.
                    "tensorboard_dir": str(tmp_path / "tensorboard")})
  workdir = f"{store}/runs/stage1"
  train = ["--config=configs/demo.py:stage1", f"--workdir={workdir}", *flags_for(overrides)]
  code, _, err = _binary("instance_loss_jax.cli.train", train, stop_at_step=6)
  assert code == 143, err[-3000:]
  assert re.search(r"preempted: stopped at step \d+ \(SIGTERM\)", err), err[-3000:]
  code, out, err = _binary("instance_loss_jax.cli.train", train)
  assert code == 0, err[-3000:]
  assert "resuming from" in err and "Traceback" not in err
  a = checkpoint.restore_variables(checkpoint.manager(local, read_only=True), 8)
  b = checkpoint.restore_variables(checkpoint.reader(workdir), 8)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), jax.tree_util.keystr(path)
  from etils import epath  # pylint: disable=g-import-not-at-top
  written = json.loads((epath.Path(workdir) / "eval" / "test-8.json").read_text())
  assert written["metrics"] == reference["metrics"]

  # What export and search do (their binaries' own code, run here: two more launches would
  # double the test's time in back-off): the run read for an index written on the failing
  # store, and searched from it.
  from instance_loss_jax.index import Index  # pylint: disable=g-import-not-at-top
  saved = Index.from_run(workdir, split="test").save(f"{store}/index")
  hits, _ = Index.load(saved).search_text("a blue square", k=3)
  assert [h.rank for h in hits] == [1, 2, 3]
  faults = {k: flaky.counts[k] - before[k] for k in before}
  assert faults["refused"] > 20 and faults["cut"] > 2, faults  # the faults did happen
  print(f"faults: {faults}")


_LOG_LINE = re.compile(r"^([IWEF]\d{4} |WARNING: All log messages before absl)")


def test_a_store_that_stays_down_ends_the_run_in_one_line_and_keeps_the_checkpoints(
    flaky, data_dir, tmp_path):
  # The store goes down (every request 503) once step 4's checkpoint is written: the next save
  # retries for about storage_retry_s, then the run ends with one line naming the checkpoint,
  # the cause and what is kept; no traceback, no client's retry log, nothing from the clean-up
  # (the claim's release, TensorBoard) in place of that line.
  flaky.set(error_rate=0.0, cut_rate=0.0, down=False)
  workdir = f"gs://{BUCKET}/runs/down"
  overrides = {**small_overrides(data_dir, epochs=10), "checkpoint_every": 4,
               "eval.at_end": False, "storage_retry_s": 6.0,
               "tensorboard_dir": str(tmp_path / "tensorboard")}
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))
  proc = subprocess.Popen(
      [sys.executable, "-m", "instance_loss_jax.cli.train", "--config=configs/demo.py:stage1",
       f"--workdir={workdir}", *flags_for(overrides)],
      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  err = []
  reader = threading.Thread(target=lambda: err.extend(iter(proc.stderr.readline, "")))
  reader.start()
  deadline = time.time() + 300
  while proc.poll() is None and time.time() < deadline:
    mgr = checkpoint.reader(workdir)
    if mgr is not None and 4 in mgr.all_steps():
      flaky.set(down=True)
      break
    time.sleep(0.2)
  down_at = time.time()
  proc.wait(timeout=600)
  waited = time.time() - down_at
  reader.join()
  flaky.set(down=False)
  text = "".join(err)
  assert proc.returncode == 1, text[-3000:]
  others = [line for line in text.splitlines() if line.strip() and not _LOG_LINE.match(line)]
  assert len(others) == 1 and others[0].startswith("error: saving step 8 to "
                                                   f"{workdir}/checkpoints failed: "), text
  assert "the checkpoints already written (4) are intact" in others[0]
  assert "Traceback" not in text
  # About storage_retry_s per request, not TensorStore's 15 min, nor Orbax's threads' 300 s.
  assert waited < 200, (waited, text[-3000:])
  # Healed: step 4 reads back whole.
  mgr = checkpoint.reader(workdir)
  assert mgr.all_steps() == [4]
  assert checkpoint.restore_variables(mgr, 4)["params"]
