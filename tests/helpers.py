"""Small configs and batches shared by the tests."""
import importlib.util
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from instance_loss_jax.config import apply_overrides, base_config

# XLA:CPU's loop emitters in place of its newer fusion emitters: the tests' programs compile
# ~30% faster (benchmarks/RESULTS.md, "Fifth pass"), and compiling is most of the suite's CPU
# time. The flag only changes how XLA:CPU generates code: TPU and GPU programs, and what the
# tests check, are the same.
_LOOP_EMITTERS = "--xla_cpu_use_fusion_emitters=false"
_KNOWN = "INSTANCE_LOSS_TEST_LOOP_EMITTERS"  # the probe's answer, for workers and binaries


def _fast_compile_flags() -> str:
  """The flag where this jaxlib's XLA has it, else nothing: jaxlib 0.12 (Python 3.12's) dropped
  it, and XLA aborts a process whose XLA_FLAGS name an unknown flag. Probed once, in a
  subprocess (~2 s), by the first test process; pytest-xdist's workers and the binaries the
  tests start inherit the answer through the environment."""
  known = os.environ.get(_KNOWN)
  if known is None:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=_LOOP_EMITTERS)
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                           capture_output=True, timeout=300, check=False)
    known = os.environ[_KNOWN] = "1" if probe.returncode == 0 else "0"
  return _LOOP_EMITTERS if known == "1" else ""


FAST_COMPILE_FLAGS = _fast_compile_flags()


# PyTorch is the torch extra, not the test extra: PyPI's build is 4.6 GB (setup.cfg).
NO_TORCH = ("PyTorch is not installed (the torch extra; launch/test.sh installs it unless "
            "INSTALL_EXTRAS leaves it out)")
requires_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason=NO_TORCH)


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test process (or a binary a test starts) with `devices` CPU devices."""
  return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAGS}".strip()


def free_port() -> int:
  """A TCP port on localhost that nothing listens on now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Processes:
  """The processes of a multi-process job on this machine, `argv_of(i, port)` each (port: a
  free one for jax.distributed's coordinator), started at once. Their output goes to files in
  `logdir`, not pipes: a pipe read only after another process has ended fills up, and the
  process writing to it stops, holding up the others in their next collective."""

  def __init__(self, argv_of, count: int, logdir, env=None):
    port = str(free_port())
    # Each sets its own XLA_FLAGS, unless `env` (added to this process's, less XLA_FLAGS) does.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | (env or {})
    self._logs = [(os.path.join(logdir, f"process{i}.out"), os.path.join(logdir,
                                                                         f"process{i}.err"))
                  for i in range(count)]
    self.procs = []
    for i, (out, err) in enumerate(self._logs):
      with open(out, "w") as stdout, open(err, "w") as stderr:
        self.procs.append(subprocess.Popen(argv_of(i, port), env=env, stdout=stdout,
                                           stderr=stderr))

  def stderr(self, i: int) -> str:
    """What process `i` has written to stderr so far."""
    with open(self._logs[i][1], errors="replace") as f:
      return f.read()

  def wait(self, timeout: float = 600, expect: int = 0) -> list[tuple[str, str]]:
    """(stdout, stderr) of each, once all have ended; a process whose exit status is not
    `expect` fails the test."""
    deadline = time.monotonic() + timeout
    try:
      for p in self.procs:
        p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      for p in self.procs:  # one stuck in a collective its peer will never join: no leftovers
        p.kill()
        p.wait()
      raise AssertionError(f"the job did not end within {timeout} s; stderr of each:\n" +
                           "\n".join(self.stderr(i)[-2000:] for i in range(len(self.procs))))
    outputs = []
    for p, (out, err) in zip(self.procs, self._logs):
      with open(out) as f_out, open(err) as f_err:
        outputs.append((f_out.read(), f_err.read()))
      assert p.returncode == expect, (p.returncode, outputs[-1][1][-3000:])
    return outputs


def load_benchmark(name: str):
  """benchmarks/NAME.py as a module (the folder is no package)."""
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "benchmarks", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def tiny_config(**overrides):
  """A model that trains in seconds on CPU: ResNet-14 of width 4, 32x32 images, a text CNN of
  two stages (one block each; the model's four compile ~1.6x slower), length 8."""
  c = base_config()
  c.batch_size = 8
  c.num_classes = 16
  c.image_size = 32
  c.model.image.depth = 14
  c.model.image.width = 4
  c.model.text.vocab_size = 40
  c.model.text.max_len = 8
  c.model.text.word_dim = 16
  c.model.text.blocks = (1, 1)
  c.model.text.widths = (16, 128)
  c.model.text.first_mids = (8, 64)
  c.model.text.strides = (1, 2)
  c.model.embed_dim = 32
  c.model.dropout = 0.0
  c.optim.schedule = ((10, 1.0),)
  return apply_overrides(c, overrides)


def random_batch(config, seed=0, num_groups=None):
  """A global batch (no device axis) with distinct labels unless num_groups is set."""
  rng = np.random.default_rng(seed)
  n = config.batch_size
  s, length = config.image_size, config.model.text.max_len
  labels = (rng.permutation(config.num_classes)[:n] if num_groups is None
            else rng.integers(0, num_groups, n))
  return dict(
      images=rng.normal(size=(n, s, s, 3)).astype(np.float32),
      tokens=rng.integers(1, config.model.text.vocab_size, (n, length)).astype(np.int32),
      labels=labels.astype(np.int32))


def host_train_state(config, key, steps_per_epoch):
  """A fresh train state as host arrays (drawn on one device): every run places its own copy, so
  a step's donation of its input never deletes this one."""
  import jax  # pylint: disable=g-import-not-at-top
  from instance_loss_jax import sharding, training as ts  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(jax.local_devices()[:1])
  return ts.host_state(ts.create_train_state(config, key, steps_per_epoch, mesh), config)


def run_steps(config, devices, batches, state, steps_per_epoch=10):
  """Steps from a host train state on a mesh of `devices`; returns (host state with W_share at
  num_classes, host metrics per step)."""
  from instance_loss_jax import sharding, training as ts  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(devices)
  step = ts.make_train_step(config, steps_per_epoch, mesh)
  state = ts.place_state(state, config, mesh)
  history = []
  for batch in batches:
    state, metrics = step(state, batch)
    history.append(sharding.to_host(metrics))
  return ts.host_state(state, config), history
