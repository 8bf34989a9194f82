"""The binaries as a user meets them: --help, --print_config, and one line for each bad input."""

import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # each case starts a Python with JAX and TensorFlow


def run(*args, script=None, module="instance_loss_jax.cli.train"):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  if script:  # the console script pip installed beside this Python
    cmd = [os.path.join(os.path.dirname(sys.executable), script)]
  else:
    cmd = [sys.executable, "-m", module]
  proc = subprocess.run(cmd + list(args), cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("script,says,flag", [
    ("instance-loss-train", "Train a dual-path model", "--workdir"),
    ("instance-loss-search", "Search an index", "--query"),
])
def test_console_scripts_help_says_what_they_do_and_lists_their_flags(script, says, flag):
  if not os.path.exists(os.path.join(os.path.dirname(sys.executable), script)):
    pytest.skip(f"{script} is not installed beside {sys.executable}")
  code, out, _ = run("--help", script=script)
  assert code == 0 and says in out and flag in out, out


def test_help_is_the_binarys_own_flags_and_helpfull_the_rest():
  _, out, _ = run("--help", module="instance_loss_jax.cli.export")
  # export's --config default (every field of a config) is not printed; no library's flags.
  assert "--workdir" in out and "--images" in out and "--helpfull" in out
  assert "backbone_bn" not in out and "--verbosity" not in out and len(out.splitlines()) < 50
  code, full, _ = run("--helpfull", module="instance_loss_jax.cli.export")
  assert code == 0 and "--verbosity" in full and "--workdir" in full


def test_the_binaries_live_in_cli_only():
  # The package root, evaluation/ and data/ run no binary: one path for each command.
  for module in ("instance_loss_jax.train", "instance_loss_jax.evaluation",
                 "instance_loss_jax.data.synthetic", "instance_loss_jax.data.prepare"):
    code, out, err = run("--help", module=module)
    assert (code != 0 and "No module named" in err) or not out.strip(), (module, out, err)


def test_compare_prints_the_runs_side_by_side(tmp_path):
  result = {"split": "test", "num_images": 10, "num_captions": 50,
            "metrics": {"i2t_r1": 20.0, "t2i_r1": 10.0, "rsum": 30.0}}
  (tmp_path / "a.json").write_text(json.dumps(result))
  code, out, err = run(f"Stage I={tmp_path / 'a.json'}", module="instance_loss_jax.cli.compare")
  assert code == 0, err[-2000:]
  assert "| run | i2t_r1 | t2i_r1 | rsum |" in out and "| Stage I | 20.0 | 10.0 | 30.0 |" in out
  # Bad arguments: one line each, no traceback.
  for args, message in (((), "the following arguments are required: NAME=PATH"),
                        ((str(tmp_path / "a.json"),), "expected NAME=PATH"),
                        ((f"A={tmp_path / 'none.json'}",), "none.json: no such file")):
    code, out, err = run(*args, module="instance_loss_jax.cli.compare")
    assert code != 0 and message in err and "Traceback" not in err, err[-2000:]


def test_print_config_lists_every_field_with_overrides_applied():
  # No --workdir: printing the config needs none.
  code, out, err = run("--config=configs/demo.py:stage2", "--config.model.embed_dim=64",
                       "--print_config")
  assert code == 0, err[-2000:]
  lines = out.splitlines()
  assert "model.embed_dim=64" in lines and "model.w_share_sharding='classes'" in lines
  assert "loss.lambdas=(1.0, 1.0, 1.0)" in lines
  assert "optim.schedule=((20, 1.0), (10, 0.1))" in lines
  assert "!!" not in out  # no YAML tags


@pytest.mark.parametrize("args,message", [
    (["--config=configs/demo.py:stage3", "--workdir=w"],
     "error: flag --config=configs/demo.py:stage3: stage 3: 1 or 2"),
    (["--config=configs/nothere.py", "--workdir=w"],
     "error: --config=configs/nothere.py: no config file there"),
    (["--config=configs/demo.py", "--workdir=w", "--config.model.nope=1"],
     "error: unknown config field in the overrides: --config.model.nope"),
    (["--config=configs/demo.py", "--workdir=w", "--config.optim.shedule=((2, 1.0),)"],
     "error: unknown config field in the overrides: --config.optim.shedule (did you mean "
     "optim.schedule?)"),
    (["--config=configs/demo.py"], "error: flag --workdir=None: --workdir is required"),
    (["--config=configs/demo.py", "--workdir=WORKDIR"],
     "error: data.json and data.image_root not set (--config.data.json=PATH)"),
    # Malformed values: named with the form expected, for a run and for --print_config alike.
    (["--config=configs/demo.py", "--workdir=WORKDIR", "--config.optim.schedule=((20, 1.0))"],
     "error: optim.schedule=(20, 1.0): expected ((epochs, lr factor), ...)"),
    (["--config=configs/demo.py", "--print_config", "--config.optim.schedule=20"],
     "error: optim.schedule=(20,): expected ((epochs, lr factor), ...)"),
    (["--config=configs/demo.py", "--print_config", "--config.data.crop_area=0.5"],
     "error: invalid config: data.crop_area=(0.5,): (low, high) with 0 < low <= high <= 1"),
    (["--config=configs/demo.py", "--print_config", "--config.batch_size=many"],
     "error: flag --config.batch_size=many"),
    # The eval binary without --config reads the run's record: none there is named.
    (["--workdir=WORKDIR", "MODULE=instance_loss_jax.cli.evaluate"],
     "error: WORKDIR/config.json: no such file (is WORKDIR a training run's workdir?)"),
    (["--print_config", "MODULE=instance_loss_jax.cli.evaluate"],
     "error: --print_config without --config prints a run's recorded config"),
])
def test_bad_input_is_one_line_naming_it(tmp_path, args, message):
  module = next((a.split("=", 1)[1] for a in args if a.startswith("MODULE=")),
                "instance_loss_jax.cli.train")
  args = [a.replace("WORKDIR", str(tmp_path / "w")) for a in args if not a.startswith("MODULE=")]
  message = message.replace("WORKDIR", str(tmp_path / "w"))
  code, _, err = run(*args, module=module)
  ours = [line for line in err.splitlines() if line.startswith("error:")]
  assert code == 1 and len(ours) == 1 and ours[0].startswith(message), err[-2000:]
  assert "Traceback" not in err


@pytest.mark.parametrize("k", ["-3", "0"])
def test_search_k_below_one_is_one_line_naming_the_flag(k):
  code, _, err = run("--index=nowhere", "--query=a dog", f"--k={k}",
                     module="instance_loss_jax.cli.search")
  ours = [line for line in err.splitlines() if line.startswith("error:")]
  assert code == 1 and ours == [f"error: flag --k={k}: {k} is not a positive integer"], err
  assert "Traceback" not in err


def test_binaries_import_tensorflow_only_when_a_run_starts():
  # --help, --print_config and a flag error answer in ~2 s instead of ~6 s: the binaries leave
  # the trainer, the evaluation and TensorFlow to main(), and catch errors from errors.py.
  modules = ("cli.train", "cli.evaluate", "cli.export", "cli.search", "cli.prepare")
  heavy = ("tensorflow", "instance_loss_jax.trainer", "instance_loss_jax.evaluation")
  code = (f"import sys; import {', '.join('instance_loss_jax.' + m for m in modules)}; "
          f"print([m for m in {heavy!r} if m in sys.modules])")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), check=True).stdout
  assert out.strip() == "[]", out


_LINGERING = '''
import threading, time
from instance_loss_jax import errors
from instance_loss_jax.cli import runner

class Waiting(threading.Thread):
  """As Orbax's commit threads after a failed save: not a daemon, waiting on what never comes,
  and a join that raises on its timeout."""
  def join(self, timeout=None):
    raise TimeoutError("did not complete")

def main(argv):
  Waiting(target=time.sleep, args=(120,)).start()
  raise errors.StorageError("saving step 8 to DIR failed: the store is down")

runner.run(main)
'''


def test_a_binary_stops_soon_after_its_error_line_whatever_threads_a_library_left():
  # A thread left waiting (Orbax's, for 300 s after a save that failed) must not hold the exit:
  # the job ends within the runner's grace after the line that says why. (A preemption exits as
  # usual: its save has finished, and a multi-host job's processes shut down together.)
  started = time.monotonic()
  proc = subprocess.run([sys.executable, "-c", _LINGERING], cwd=ROOT, capture_output=True,
                        text=True, timeout=100)
  took = time.monotonic() - started
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: saving step 8 to DIR failed: the store is down"), proc.stderr
  assert "Traceback" not in proc.stderr
  assert took < 60, took  # grace 5 s; the thread alone would hold it 120 s
