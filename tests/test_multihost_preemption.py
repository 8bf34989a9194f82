"""A preemption that reaches one host of a multi-host job: the training binary as two processes
(jax.distributed over gloo, one CPU device each), SIGTERM to process 1 only.

JAX's preemption service takes the signal on the process that gets it and tells the other
through the coordination service; Orbax's `reached_preemption`, asked after every step, then
answers True on both at the same step. Both save that step and exit 143, and the resumed pair
ends bit for bit as an uninterrupted pair does.
"""

import os
import re
import signal
import sys
import time

import numpy as np
import pytest

from helpers import Processes, xla_flags
from test_training import (  # noqa: F401  (data_dir: a fixture)
    ROOT, _STEP_LOGGED, assert_same_final_variables, checkpoint_steps, data_dir, flags_for,
    signal_while_frozen, small_overrides)

pytestmark = pytest.mark.slow
STEPS = 16  # 4 epochs of 4 steps, a checkpoint every 4


def launch_pair(workdir, overrides, logdir):
  """The training binary as a job of two processes, started at once."""
  os.makedirs(logdir, exist_ok=True)
  return Processes(lambda i, port: [
      sys.executable, "-m", "instance_loss_jax.cli.train",
      f"--config={os.path.join(ROOT, 'configs', 'demo.py')}:stage2", f"--workdir={workdir}",
      f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
      "--cpu_collectives=gloo"] + flags_for(overrides), 2, logdir,
      env={"JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)})


def test_sigterm_to_one_process_stops_both_at_one_step_and_the_resume_is_exact(data_dir,
                                                                              tmp_path):
  overrides = {**small_overrides(data_dir, epochs=STEPS // 4), "eval.at_end": False,
               "stage": 2, "freeze_backbone": False}
  straight = str(tmp_path / "straight")
  launch_pair(straight, overrides, tmp_path / "logs-straight").wait()

  # Once process 0 has logged the target step, with a checkpoint written: SIGTERM to process 1
  # while both are frozen.
  stopped = str(tmp_path / "stopped")
  target = int(np.random.default_rng().integers(5, 10))
  pair = launch_pair(stopped, overrides, tmp_path / "logs-stopped")
  deadline, note = time.time() + 300, "the job ended before the target step"
  while time.time() < deadline and all(p.poll() is None for p in pair.procs):
    logged = [int(m.group(1)) for m in _STEP_LOGGED.finditer(pair.stderr(0))]
    saved = checkpoint_steps(stopped) if os.path.isdir(os.path.join(stopped, "checkpoints")) \
        else []
    if logged and logged[-1] >= target and saved:
      if signal_while_frozen(pair.procs, pair.procs[1], signal.SIGTERM):
        note = f"SIGTERM to process 1 after step {logged[-1]} was logged, checkpoints {saved}"
      break
    time.sleep(0.01)
  errs = [err for _, err in pair.wait(expect=143)]

  # Both stopped at the same step, after saving it. (Process 1 would have ended with -15, its
  # signal's default, had JAX's preemption service not taken the signal.)
  said = [re.findall(r"preempted: stopped at step (\d+) \(preemption notice\)", err)
          for err in errs]
  assert len(said[0]) == 1 and said[0] == said[1], (note, errs[0][-2000:], errs[1][-2000:])
  step = int(said[0][0])
  assert target <= step < STEPS and checkpoint_steps(stopped)[-1] == step, (note, step)
  assert not any("Traceback" in err for err in errs), note

  # The same command resumes both from that step; the end is the uninterrupted pair's.
  resumed = [err for _, err in launch_pair(stopped, overrides, tmp_path / "logs-resumed").wait()]
  assert f"resuming from {stopped} step {step}" in resumed[0], resumed[0][-2000:]
  assert_same_final_variables(straight, stopped, STEPS)
