r"""Exit statuses of the training binary stopped by SIGTERM mid-run, N launches.

    python benchmarks/sigterm_exit.py --runs=6

Each launch trains the signal-chain test's Stage II run (tests/test_training.py: the tests'
small model, 160 steps, a checkpoint every 20) on 2 CPU devices and gets SIGTERM once it has
logged step 30 + 7 i (launch i). A preempted run must exit with 143; anything else (SIGABRT: -6)
is printed with its stderr's last lines. The data is made once under --workdir.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

flags.DEFINE_integer("runs", 6, "launches")
flags.DEFINE_string("workdir", "/tmp/sigterm_exit", "data and runs")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  # pylint: disable=g-import-not-at-top
  from helpers import xla_flags
  from test_training import RESUME_STEPS, small_overrides, training_command
  from instance_loss_jax.data import synthetic
  data = os.path.join(FLAGS.workdir, "data")
  if not os.path.exists(os.path.join(data, "dataset.json")):
    synthetic.generate(data, num_images=40, seed=1, image_size=40, w2v_dim=16, w2v_epochs=2)
  overrides = {**small_overrides(data, epochs=RESUME_STEPS // 4), "checkpoint_every": 20,
               "eval.at_end": False, "stage": 2, "freeze_backbone": False}
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(2))
  codes = []
  for i in range(FLAGS.runs):
    run = os.path.join(FLAGS.workdir, f"run{i}")
    shutil.rmtree(run, ignore_errors=True)
    proc = subprocess.Popen(training_command(run, overrides), cwd=ROOT, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines = []
    for line in proc.stderr:
      lines.append(line)
      logged = re.search(r"\] step (\d+)/", line)
      if logged and int(logged.group(1)) >= 30 + 7 * i:
        proc.send_signal(signal.SIGTERM)
        break
    lines.append(proc.stderr.read())
    proc.wait()
    codes.append(proc.returncode)
    if proc.returncode != 143:
      print(f"launch {i}: exit {proc.returncode}\n" + "".join(lines)[-1500:])
  print(f"exit statuses: {codes}; {codes.count(143)} of {len(codes)} are 143")


if __name__ == "__main__":
  app.run(main)
